"""Official checkpoint import/export: key mappings between the official Kwai-Kolors/ResTok state dicts and ours.

Organised by model, one section each. Every mapping is 1:1 (a tensor is renamed, never split, merged or
reshaped), so a converted state dict must match our model exactly; anything else raises with the full list of
missing keys, unexpected keys and shape mismatches, and nothing is loaded.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from restok.models.generator import HARGenerator


def _rename(key: str, rules: list[tuple[str, str]], src: int) -> str | None:
    """Apply the first matching rule (patterns use {i} for a layer index); None if no rule matches."""
    for rule in rules:
        pattern = "^" + re.escape(rule[src]).replace(r"\{i\}", r"(\d+)") + "$"
        match = re.match(pattern, key)
        if match:
            return rule[1 - src].replace("{i}", match.group(1)) if match.groups() else rule[1 - src]
    return None


def _load_renamed(model: nn.Module, official_sd: dict[str, torch.Tensor], rules: list[tuple[str, str]],
                  what: str) -> None:
    ours = model.state_dict()
    renamed, unexpected = {}, []
    for key, value in official_sd.items():
        new = _rename(key, rules, src=1)
        if new is None or new not in ours:
            unexpected.append(key)
        else:
            renamed[new] = torch.as_tensor(value)
    missing = [k for k in ours if k not in renamed]
    shapes = [f"{k}: official {tuple(v.shape)} vs ours {tuple(ours[k].shape)}"
              for k, v in renamed.items() if v.shape != ours[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"official {what} state dict does not match the model; nothing was loaded.\n"
                         f"  missing (ours, no official key): {missing}\n"
                         f"  unexpected (official keys without a place): {unexpected}\n"
                         f"  shape mismatches: {shapes}")
    model.load_state_dict(renamed, strict=True)


def _export_renamed(model: nn.Module, rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        new = _rename(key, rules, src=0)
        if new is None:
            raise KeyError(f"no official name for parameter {key!r}; extend the mapping in {__name__}")
        out[new] = value.detach().clone()
    return out


#################################################################################
#   Generator: official HAR `Transformer` (gpt_har.py), plain AR (gpt_vanilla.py)  #
#################################################################################
# (ours, official). The official plain-AR model has the same keys minus the special-token table.
GENERATOR_KEYS: list[tuple[str, str]] = [
    ("tok_emb.weight", "tok_embeddings.weight"),
    ("cls_emb.table.weight", "cls_embedding.embedding_table.weight"),
    ("special_emb.weight", "spe_tok_embeddings.special_embeddings.weight"),
    ("blocks.{i}.attn_norm.weight", "layers.{i}.attention_norm.weight"),
    ("blocks.{i}.attn.qkv.weight", "layers.{i}.attention.wqkv.weight"),  # rows q, k, v in both
    ("blocks.{i}.attn.proj.weight", "layers.{i}.attention.wo.weight"),
    ("blocks.{i}.ffn_norm.weight", "layers.{i}.ffn_norm.weight"),
    ("blocks.{i}.ffn.w_gate.weight", "layers.{i}.feed_forward.w1.weight"),
    ("blocks.{i}.ffn.w_up.weight", "layers.{i}.feed_forward.w3.weight"),
    ("blocks.{i}.ffn.w_down.weight", "layers.{i}.feed_forward.w2.weight"),
    ("norm.weight", "norm.weight"),
    ("head.weight", "output.weight"),
]


def load_official_generator_state(model: HARGenerator, official_sd: dict[str, torch.Tensor]) -> None:
    """Load an official GPT state dict (keys as in gpt_har.py) into `model`, all or nothing."""
    _load_renamed(model, official_sd, GENERATOR_KEYS, "generator")


def export_official_generator_state(model: HARGenerator) -> dict[str, torch.Tensor]:
    """Our generator's weights under the official key names (inverse of load_official_generator_state)."""
    return _export_renamed(model, GENERATOR_KEYS)
