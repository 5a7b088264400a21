"""Official checkpoint key layouts: the shared mapping engine and the generator's mapping and config.

The official Kwai-Kolors/ResTok state dicts (TiTok / LlamaGen names) are mapped onto ours through a table of
`Slot`s. A slot is one tensor of ours and the official tensor(s) it is made of: a rename, a reshape (a 1x1 conv
(O, I, 1, 1) is our Linear (O, I)) or rows (official ParameterList entries (1, D) are the rows of one (n, D)
parameter of ours). Only views change, never values, so export then load is bit-identical.

Loading is all or nothing: every official key must have a place of the expected shape and every tensor of ours
must be covered; otherwise the error lists the missing keys, the unexpected keys and the shape mismatches, and
the model is left untouched. Official keys our model lacks by design (the frozen VF teacher) are skipped only
when they match the caller's allow-list of glob patterns, and are returned by name.

The tokenizer's table lives in `restok.convert.tokenizer`; reading and writing checkpoint files in
`restok.convert.checkpoint`. docs/method.md, generator §1 (sizes), restok §0 (configs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from restok.models.generator import GeneratorConfig, HARGenerator

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Slot:
    """Our tensor `ours` (shape `shape`) is made of the official tensors `official` [(key, shape), ...], which
    are concatenated along dim 0 after reshaping each to (-1, *shape[1:])."""

    ours: str
    shape: Shape
    official: tuple[tuple[str, Shape], ...]


def same(ours: str, shape: Shape, official: str) -> Slot:
    return Slot(ours, shape, ((official, shape),))


def conv1x1(ours: str, shape: Shape, official: str) -> Slot:
    """Our Linear weight (O, I) <-> an official 1x1 conv weight (O, I, 1, 1)."""
    return Slot(ours, shape, ((official, (*shape, 1, 1)),))


def rows(ours: str, shape: Shape, official: Sequence[str], row_shape: Shape) -> Slot:
    """Our (n, ...) parameter <-> n official tensors of shape row_shape (e.g. a ParameterList of (1, D))."""
    return Slot(ours, shape, tuple((key, row_shape) for key in official))


def load_slots(
    model: nn.Module,
    official_sd: Mapping[str, torch.Tensor],
    slots: Sequence[Slot],
    what: str,
    skip: Sequence[str] = (),
) -> list[str]:
    """Load `official_sd` into `model` through `slots`, all or nothing. Official keys without a slot that match a
    glob in `skip` are ignored; their names are returned (sorted)."""
    ours = model.state_dict()
    covered = {slot.ours for slot in slots}
    if covered != set(ours):  # a bug in the table, not in the checkpoint
        raise RuntimeError(
            f"{what} key table out of sync with the model: no slot for {sorted(set(ours) - covered)}, "
            f"slots without a tensor {sorted(covered - set(ours))}"
        )
    expected = {key: (slot, shape) for slot in slots for key, shape in slot.official}
    skipped = sorted(k for k in official_sd if k not in expected and any(fnmatchcase(k, p) for p in skip))
    unexpected = [k for k in official_sd if k not in expected and k not in skipped]
    missing = [f"{key} (-> {slot.ours})" for key, (slot, _) in expected.items() if key not in official_sd]
    shapes = [
        f"{key} -> {slot.ours}: official {tuple(official_sd[key].shape)} vs ours {slot.shape}"
        + ("" if shape == slot.shape else f" (expected official {shape})")
        for key, (slot, shape) in expected.items()
        if key in official_sd and tuple(official_sd[key].shape) != shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"official {what} state dict does not match the model; nothing was loaded.\n"
            f"  missing (official keys the model needs): {missing}\n"
            f"  unexpected (official keys without a place; allow-list: {list(skip)}): {unexpected}\n"
            f"  shape mismatches: {shapes}"
        )
    converted = {}
    for slot in slots:
        parts = [torch.as_tensor(official_sd[key]).reshape(-1, *slot.shape[1:]) for key, _ in slot.official]
        converted[slot.ours] = torch.cat(parts).reshape(slot.shape) if len(parts) > 1 else parts[0].reshape(slot.shape)
    model.load_state_dict(converted, strict=True)
    return skipped


def export_slots(model: nn.Module, slots: Sequence[Slot]) -> dict[str, torch.Tensor]:
    """Our weights under the official names and shapes (inverse of load_slots)."""
    ours = model.state_dict()
    out = {}
    for slot in slots:
        value = ours[slot.ours].detach()
        chunks = value.split(1) if len(slot.official) > 1 else (value,)
        for (key, shape), chunk in zip(slot.official, chunks, strict=True):
            out[key] = chunk.reshape(shape).clone()
    return out


def unwrap_config(official: Mapping) -> dict:
    """An official config as a plain dict: the YAML tree, or the hub's config.json (possibly under "config")."""
    tree = dict(official)
    return dict(tree["config"]) if "config" in tree and len(tree) == 1 else tree


def resolve_interpolations(root: Mapping, node):
    """`node` with the OmegaConf references the official YAMLs use (whole values "${a.b.c}") resolved against
    `root`; only the subtree that is read gets resolved."""
    if isinstance(node, Mapping):
        return {k: resolve_interpolations(root, v) for k, v in node.items()}
    if not (isinstance(node, str) and (match := re.fullmatch(r"\$\{([\w.]+)\}", node))):
        return node
    target = root
    for part in match.group(1).split("."):
        if not isinstance(target, Mapping) or part not in target:
            raise ValueError(f"official config: unresolvable interpolation {node}")
        target = target[part]
    return resolve_interpolations(root, target)


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
# Official keys that are never weights: a KV cache registered by `setup_caches` (present only if a model was
# saved after sampling). Skipped by name, reported.
GENERATOR_SKIP = ("layers.*.attention.kv_cache.k_cache", "layers.*.attention.kv_cache.v_cache")


def _official_name(key: str) -> str:
    for ours, official in GENERATOR_KEYS:
        match = re.fullmatch(re.escape(ours).replace(r"\{i\}", r"(\d+)"), key)
        if match:
            return official.replace("{i}", match.group(1)) if match.groups() else official
    raise KeyError(f"no official name for generator parameter {key!r}; extend GENERATOR_KEYS in {__name__}")


def generator_slots(model: HARGenerator) -> list[Slot]:
    return [same(key, tuple(v.shape), _official_name(key)) for key, v in model.state_dict().items()]


def load_official_generator_state(
    model: HARGenerator, official_sd: Mapping[str, torch.Tensor], skip: Sequence[str] = GENERATOR_SKIP
) -> list[str]:
    """Load an official GPT state dict (keys as in gpt_har.py / gpt_vanilla.py) into `model`, all or nothing.
    Returns the skipped official keys."""
    return load_slots(model, official_sd, generator_slots(model), "generator", skip)


def export_official_generator_state(model: HARGenerator) -> dict[str, torch.Tensor]:
    """Our generator's weights under the official key names (inverse of load_official_generator_state)."""
    return export_slots(model, generator_slots(model))


# LlamaGen factory sizes (n_layer, n_head, dim), gpt_har.py / gpt_vanilla.py `GPT_models`.
OFFICIAL_GPT_SIZES = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-1B": (22, 32, 2048),
    "GPT-3B": (24, 32, 3200),
    "GPT-7B": (32, 32, 4096),
}


def _ffn_hidden(dim: int, multiplier: float | None, multiple_of: int) -> int:
    """LlamaGen's SwiGLU width: round_up(int(mult * int(8 * dim / 3)), multiple_of)."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of


def official_generator_config(official: Mapping) -> GeneratorConfig:
    """GeneratorConfig from an official config: the training/inference YAML tree (uses `model.generator`,
    interpolations resolved) or the hub's config.json (the `ModelArgs` fields: dim, n_layer, ...).
    Refuses what our generator cannot represent, naming the official key."""
    tree = unwrap_config(official)
    if "model" in tree:  # the YAML layout
        if not isinstance(tree["model"], Mapping) or "generator" not in tree["model"]:
            raise ValueError("official generator config: the YAML layout needs model.generator")
        gen = resolve_interpolations(tree, tree["model"]["generator"])
        if gen.get("model_type") not in OFFICIAL_GPT_SIZES:
            raise ValueError(
                f"official model.generator.model_type={gen.get('model_type')!r}; supported: "
                f"{', '.join(OFFICIAL_GPT_SIZES)}"
            )
        n_layer, n_head, dim = OFFICIAL_GPT_SIZES[gen["model_type"]]
        dropout = gen.get("dropout_p", 0.1)
        args = dict(
            dim=dim,
            n_layer=n_layer,
            n_head=n_head,
            vocab_size=gen["vocab_size"],
            block_size=gen["block_size"],
            num_classes=gen["num_classes"],
            cls_token_num=gen.get("cls_token_num", 1),
            model_type=gen.get("gpt_type", "c2i"),
            resid_dropout_p=dropout,
            ffn_dropout_p=dropout,
            token_dropout_p=gen.get("token_dropout_p", 0.1),
            drop_path_rate=gen.get("drop_path_rate", 0.0),
            har=bool(gen.get("har", False)),
            ar_token_num=gen.get("ar_token_num", 4),
            spe_token_num=gen.get("spe_token_num", 127),
        )
    else:  # config.json: ModelArgs; only the HAR ModelArgs has spe_token_num
        args = {**tree, "har": "spe_token_num" in tree}
    absent = [k for k in ("dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes") if k not in args]
    if absent:
        raise ValueError(
            f"official generator config lacks {absent} (expected model.generator of a YAML or the "
            "ModelArgs of a config.json)"
        )
    for key, allowed in (("model_type", "c2i"), ("cls_token_num", 1), ("drop_path_rate", 0.0)):
        if args.get(key, allowed) != allowed:
            raise ValueError(
                f"official {key}={args[key]!r} is not supported (ours: {allowed!r}; "
                "class-conditional, one condition token, no stochastic depth)"
            )
    if args.get("n_kv_head") not in (None, args["n_head"]):
        raise ValueError(f"official n_kv_head={args['n_kv_head']} (grouped-query attention) is not supported")
    multiple_of = args.get("multiple_of", 256)
    return GeneratorConfig(
        dim=args["dim"],
        n_layer=args["n_layer"],
        n_head=args["n_head"],
        ffn_hidden=None
        if args.get("ffn_dim_multiplier") is None  # None = the same default rule as LlamaGen
        else _ffn_hidden(args["dim"], args["ffn_dim_multiplier"], multiple_of),
        ffn_multiple_of=multiple_of,
        vocab_size=args["vocab_size"],
        num_tokens=args["block_size"],
        num_classes=args["num_classes"],
        class_dropout_prob=args.get("class_dropout_prob", 0.1),
        rope_base=float(args.get("rope_base", 10000)),
        norm_eps=args.get("norm_eps", 1e-5),
        token_dropout=args.get("token_dropout_p", 0.1),
        attn_dropout=args.get("attn_dropout_p", 0.0),
        resid_dropout=args.get("resid_dropout_p", 0.1),
        ffn_dropout=args.get("ffn_dropout_p", 0.1),
        init_std=args.get("initializer_range", 0.02),
        mode="har" if args["har"] else "ar",
        ar_token_num=args.get("ar_token_num", 4) if args["har"] else GeneratorConfig.ar_token_num,
        spe_token_num=args.get("spe_token_num") if args["har"] else None,
    )


def export_official_generator_config(cfg: GeneratorConfig) -> dict:
    """The official `ModelArgs` dict (the hub's config.json) for our config; raises if the FFN width cannot be
    written as LlamaGen's multiple_of / ffn_dim_multiplier rule."""
    multiplier = None
    if cfg.ffn_hidden_dim != _ffn_hidden(cfg.dim, None, cfg.ffn_multiple_of):
        multiplier = cfg.ffn_hidden_dim / int(2 * 4 * cfg.dim / 3)
        if _ffn_hidden(cfg.dim, multiplier, cfg.ffn_multiple_of) != cfg.ffn_hidden_dim:
            raise ValueError(f"generator.ffn_hidden={cfg.ffn_hidden} has no official ffn_dim_multiplier form")
    out = dict(
        dim=cfg.dim,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_kv_head=None,
        multiple_of=cfg.ffn_multiple_of,
        ffn_dim_multiplier=multiplier,
        rope_base=cfg.rope_base,
        norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std,
        token_dropout_p=cfg.token_dropout,
        attn_dropout_p=cfg.attn_dropout,
        resid_dropout_p=cfg.resid_dropout,
        ffn_dropout_p=cfg.ffn_dropout,
        drop_path_rate=0.0,
        num_classes=cfg.num_classes,
        caption_dim=2048,
        class_dropout_prob=cfg.class_dropout_prob,
        model_type="c2i",
        vocab_size=cfg.vocab_size,
        cls_token_num=1,
        block_size=cfg.num_tokens,
        max_batch_size=32,
        max_seq_len=2048,
    )  # caption_dim, max_*: unused ModelArgs defaults
    if cfg.mode == "har":
        out.update(ar_token_num=cfg.ar_token_num, spe_token_num=cfg.num_special)
    return out
