"""Official ResTok tokenizer checkpoints: key layout and config translation, both directions.

Official layout (Kwai-Kolors/ResTok e0059cb, `modeling/restok.py`, `modules/blocks.py`, `maskgit_vqgan.py`; docs/method.md,
tokenizer §2-7) against ours (`restok.models.tokenizer`):

    official                                         ours
    pixel_encoder.conv_in / down.i.block.j / mid.j   pixel_encoder.layers.k (flat Sequential, same order)
      ResnetBlock norm1 conv1 norm2 conv2 nin_shortcut   ResBlock body.0 body.2 body.3 body.5 shortcut
    pixel_decoder.up.i.upsample_conv                 pixel_decoder.layers.k.conv (up.i runs coarse first)
    encoder.level_embedding.s (1, D)                 encoder.image_level_emb[s] (S, D)
    encoder.latent_token_level_embedding.l (1, D)    encoder.latent_level_emb[l] (levels, D); decoder likewise
    encoder.conv_out.l (8, D, 1, 1)                  encoder.proj.linears[l] (8, D)
    blocks.i.gamma_1 / gamma_2 / mlp.fc1 / mlp.fc2   blocks.i.gamma1 / gamma2 / mlp.0 / mlp.2
    decoder.latent_mask_token (1, 1, 8)              decoder.latent_mask_token (8,)
    decoder.mask_token / feat_mask_token (1, 1, D)   decoder.image_queries.tokens / feature_queries.tokens (1, D)
    decoder.decoder_embed.l                          decoder.embed.linears[l]
    decoder.ffn (256, D, 1, 1)                       decoder.head (256, D)
    quantize.embedding.weight                        quantizer.codebook
    vf_proj / vf_proj_dec (V, D, 1, 1)               vf_enc_proj / vf_dec_proj (V, D)
    foundation_model.* (frozen VF teacher)           none by design: skipped through TOKENIZER_SKIP

The official model hard-codes what ours configures (pixel CNN plan, ViT sizes small/base/large, nearest merging,
the legacy head); `check_official_layout` names the field of ours that the official layout cannot hold.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NoReturn
import torch

from restok.convert.official import (
    Slot,
    conv1x1,
    export_slots,
    load_slots,
    resolve_interpolations,
    rows,
    same,
    unwrap_config,
)
from restok.models.tokenizer import ResTok, TokenizerConfig

OFFICIAL_VIT_SIZES = {"small": (512, 6, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}  # width, depth, heads
OFFICIAL_VF_DIMS = {"mae": 1024, "dinov2": 1024, "dinov2_b": 768, "dinov3": 1024, "clip": 1024, "siglip2": 1024}
OFFICIAL_PIXEL_CNN = dict(pixel_channels=(128, 128, 256, 256, 512), pixel_res_blocks=2, pixel_z_channels=256)
OFFICIAL_MAX_LEVEL = 256  # largest level in the official pooling-grid table
# Official keys our model has no place for by design: the frozen VF teacher (ours is outside the tokenizer).
TOKENIZER_SKIP = ("foundation_model.*",)
# The VF-alignment training parts; add to the skip list to load a VF-trained checkpoint into a vf_align=False model.
VF_TRAINING_KEYS = ("vf_proj.weight", "vf_proj_dec.weight", "decoder.feat_mask_token", "mlp_proj.*")

_BLOCK = {"gamma1": "gamma_1", "gamma2": "gamma_2", "mlp.0.": "mlp.fc1.", "mlp.2.": "mlp.fc2."}
_RESBLOCK = {
    "body.0.": "norm1.",
    "body.2.": "conv1.",
    "body.3.": "norm2.",
    "body.5.": "conv2.",
    "shortcut.": "nin_shortcut.",
    "conv.": "",
}
_ROWS = {
    "encoder.image_level_emb": "encoder.level_embedding.{}",
    "encoder.latent_level_emb": "encoder.latent_token_level_embedding.{}",
    "decoder.latent_level_emb": "decoder.latent_token_level_embedding.{}",
}
_TOKENS = {
    "decoder.latent_mask_token": "decoder.latent_mask_token",
    "decoder.image_queries.tokens": "decoder.mask_token",
    "decoder.feature_queries.tokens": "decoder.feat_mask_token",
}
_CONV1X1 = {
    "decoder.head.weight": "decoder.ffn.weight",
    "vf_enc_proj.weight": "vf_proj.weight",
    "vf_dec_proj.weight": "vf_proj_dec.weight",
}
_RENAMES = {"decoder.head.bias": "decoder.ffn.bias", "quantizer.codebook": "quantize.embedding.weight"}


def check_official_layout(cfg: TokenizerConfig) -> None:
    """Raise ValueError naming the first field of ours that the official model cannot represent."""
    blockers = [  # (field, value, allowed, why)
        ("merge_op", cfg.merge_op, cfg.merge_op == "subsample", "the official merge is nearest subsampling only"),
        (
            "latent_init",
            cfg.latent_init,
            cfg.latent_init != "learned",
            "official learnable_latent_tokens crashes (NameError)",
        ),
        (
            "latent_queries",
            cfg.latent_queries,
            cfg.latent_queries == "hierarchical",
            "the official latents are always levelled",
        ),
        ("legacy_head", cfg.legacy_head, cfg.legacy_head, "official is_legacy: false has another decoder head"),
    ]
    blockers += [
        (name, getattr(cfg, name), getattr(cfg, name) == value, f"the official pixel CNNs are fixed at {value}")
        for name, value in OFFICIAL_PIXEL_CNN.items()
    ]
    for part in ("enc", "dec"):
        size = (getattr(cfg, f"{part}_width"), getattr(cfg, f"{part}_depth"), getattr(cfg, f"{part}_heads"))
        blockers.append(
            (
                f"{part}_width/depth/heads",
                size,
                size in OFFICIAL_VIT_SIZES.values(),
                f"official ViT sizes (width, depth, heads): {OFFICIAL_VIT_SIZES}",
            )
        )
    official_merges = tuple(int(i / cfg.hierarchy_stages * cfg.enc_depth) - 1 for i in range(1, cfg.hierarchy_stages))
    blockers.append(
        (
            "hierarchy_stages",
            cfg.hierarchy_stages,
            official_merges == cfg.merge_blocks,
            f"the official float formula merges in blocks {official_merges}",
        )
    )
    blockers.append(
        (
            "level_sizes",
            cfg.level_sizes,
            max(cfg.level_sizes) <= OFFICIAL_MAX_LEVEL,
            f"official levels hold at most {OFFICIAL_MAX_LEVEL} tokens",
        )
    )
    for name, value, ok, why in blockers:
        if not ok:
            raise ValueError(f"tokenizer.{name}={value!r} has no official equivalent: {why}")


def _pixel_names(cfg: TokenizerConfig, decoder: bool) -> list[str | None]:
    """Official module path of each entry of our flat pixel CNN Sequential (None: no parameters)."""
    stages, blocks = len(cfg.pixel_channels), cfg.pixel_res_blocks
    mid, head = [f"mid.{j}" for j in range(blocks)], ["norm_out", None, "conv_out"]
    if not decoder:
        names: list[str | None] = ["conv_in"]
        for i in range(stages):
            names += [f"down.{i}.block.{j}" for j in range(blocks)] + ([None] if i < stages - 1 else [])
        return names + mid + head
    names = ["conv_in", *mid]
    for i in reversed(range(stages)):
        names += [f"up.{i}.block.{j}" for j in range(blocks)] + ([f"up.{i}.upsample_conv"] if i > 0 else [])
    return names + head


def _sub(text: str, table: Mapping[str, str]) -> str:
    for ours, official in table.items():
        text = text.replace(ours, official)
    return text


def tokenizer_slots(model: ResTok) -> list[Slot]:
    """The key table of `model`: one Slot per tensor of ours."""
    cfg = model.cfg
    check_official_layout(cfg)
    pixel = {part: _pixel_names(cfg, part == "pixel_decoder") for part in ("pixel_encoder", "pixel_decoder")}
    slots = []
    for key, value in model.state_dict().items():
        shape = tuple(value.shape)
        if key in _ROWS:
            slots.append(rows(key, shape, [_ROWS[key].format(i) for i in range(shape[0])], (1, *shape[1:])))
        elif key in _TOKENS:
            slots.append(Slot(key, shape, ((_TOKENS[key], (1, 1, shape[-1])),)))
        elif key in _CONV1X1:
            slots.append(conv1x1(key, shape, _CONV1X1[key]))
        elif match := re.fullmatch(r"encoder\.proj\.linears\.(\d+)\.(weight|bias)", key):
            level, leaf = match.groups()
            make = conv1x1 if leaf == "weight" else same
            slots.append(make(key, shape, f"encoder.conv_out.{level}.{leaf}"))
        elif match := re.fullmatch(r"decoder\.embed\.linears\.(\d+)\.(\w+)", key):
            slots.append(same(key, shape, f"decoder.decoder_embed.{match.group(1)}.{match.group(2)}"))
        elif match := re.fullmatch(r"(pixel_encoder|pixel_decoder)\.layers\.(\d+)\.(.+)", key):
            part, index, rest = match.groups()
            slots.append(same(key, shape, f"{part}.{pixel[part][int(index)]}.{_sub(rest, _RESBLOCK)}"))
        elif re.match(r"(encoder|decoder)\.blocks\.", key):
            slots.append(same(key, shape, _sub(key, _BLOCK)))
        else:  # patch_embed, ln_pre, ln_post, head bias, codebook
            slots.append(same(key, shape, _RENAMES.get(key, key)))
    return slots


def load_official_tokenizer_state(
    model: ResTok, official_sd: Mapping[str, torch.Tensor], skip: Sequence[str] = TOKENIZER_SKIP
) -> list[str]:
    """Load an official ResTok state dict into `model`, all or nothing (errors list missing / unexpected keys
    and shape mismatches). Official keys matching a glob in `skip` are ignored and returned by name."""
    return load_slots(model, official_sd, tokenizer_slots(model), "tokenizer", skip)


def export_official_tokenizer_state(model: ResTok) -> dict[str, torch.Tensor]:
    """Our tokenizer's weights in the official layout (raises if the architecture has no official form)."""
    return export_slots(model, tokenizer_slots(model))


# ---------------------------------------------------------------------------------------------------------
# Config translation (official keys under model.vq_model; code defaults where a key is absent)
# ---------------------------------------------------------------------------------------------------------


def _refuse(key: str, value, why: str) -> NoReturn:
    raise ValueError(f"official model.vq_model.{key}={value!r} is not supported: {why}")


def official_tokenizer_config(official: Mapping) -> TokenizerConfig:
    """TokenizerConfig from an official config tree (the YAML, or the hub's config.json written from it).
    Loss-only keys (entropy_loss_ratio, the losses section) and init-only keys (pretrained_vf_weight) are not part
    of the model and are ignored; settings the official code cannot run, or ours cannot represent, are refused."""
    tree = unwrap_config(official)
    try:
        vq, crop = tree["model"]["vq_model"], tree["dataset"]["preprocessing"]["crop_size"]
    except (KeyError, TypeError) as err:
        raise ValueError("official config needs model.vq_model and dataset.preprocessing.crop_size") from err
    vq, crop = resolve_interpolations(tree, vq), resolve_interpolations(tree, crop)
    fixed = {  # key: (the value we support, official default when absent, why)
        "vae_encoder": (True, False, "the 16x16 patchify encoder (ours always has the pixel CNN)"),
        "learnable_latent_tokens": (False, False, "the official encoder crashes (NameError _expand_token)"),
        "latent_hierarchy": (True, True, "the 1-D area latent init is not implemented"),
        "multi_quant": (True, True, "ours has per-level heads and embeddings"),
        "use_l2_norm": (True, True, "ours always L2-normalises (cosine VQ)"),
        "reverse_proj": (True, True, "the official reverse_proj: false path crashes (AttributeError)"),
        "is_legacy": (True, True, "the non-legacy decoder head does not feed the pixel CNN"),
        "reduction_ratio": (0.5, 0.5, "ours merges pairs (ratio 0.5)"),
        "vit_enc_patch_size": (16, 16, "the grid is crop_size / 16"),
        "vit_dec_patch_size": (16, 16, "the grid is crop_size / 16"),
    }
    for key, (wanted, default, why) in fixed.items():
        if vq.get(key, default) != wanted:
            _refuse(key, vq.get(key, default), why)
    num_latent = vq["num_latent_tokens"]
    if num_latent < 2 or num_latent & (num_latent - 1):
        _refuse("num_latent_tokens", num_latent, "needs a power of 2 (levels 1, 1, 2, 4, ...)")
    sizes = {}
    for part in ("enc", "dec"):
        name = vq[f"vit_{part}_model_size"]
        if name not in OFFICIAL_VIT_SIZES:
            _refuse(f"vit_{part}_model_size", name, f"the official sizes are {', '.join(OFFICIAL_VIT_SIZES)}")
        sizes.update(zip((f"{part}_width", f"{part}_depth", f"{part}_heads"), OFFICIAL_VIT_SIZES[name]))
    use_vf = vq.get("use_vf")
    enc_sup, dec_sup = vq.get("encoder_feature_supervision", True), vq.get("decoder_feature_supervision", False)
    vf_align = use_vf is not None and (enc_sup or dec_sup)
    if use_vf is not None and use_vf not in OFFICIAL_VF_DIMS:
        _refuse("use_vf", use_vf, f"known VF models: {', '.join(OFFICIAL_VF_DIMS)}")
    if vf_align and not (enc_sup and dec_sup):
        _refuse("encoder/decoder_feature_supervision", (enc_sup, dec_sup), "ours aligns both or neither")
    if vf_align and not vq.get("learnable_dec_feat_tokens", True):
        _refuse("learnable_dec_feat_tokens", False, "ours has learned feature queries only")
    merges = vq.get("merge_tokens", False) and vq.get("hierarchy_stages", 4) > 0
    return TokenizerConfig(
        resolution=crop,
        **OFFICIAL_PIXEL_CNN,
        **sizes,
        level_sizes=(1, *(2**i for i in range(num_latent.bit_length() - 1))),
        hierarchy_stages=vq.get("hierarchy_stages", 4) if merges else 1,
        codebook_size=vq["codebook_size"],
        code_dim=vq["token_size"],
        commitment_cost=vq["commitment_cost"],
        min_tokens=vq["num_min_tokens"],
        drop_prob=vq.get("drop_prob", 0.2) if vq.get("drop_latent_tokens", False) else 0.0,
        vf_dim=OFFICIAL_VF_DIMS[use_vf] if vf_align else None,
        vf_align=vf_align,
        rope_theta=float(vq.get("rope_base_len", 10000)),
        residual_image_tokens=vq.get("residual_image_tokens", True),
        merge_op="subsample",
        latent_init="residual_pool" if vq.get("residual_latent_tokens", True) else "pool",
        latent_queries="hierarchical",
        image_queries="learned" if vq.get("learnable_dec_image_tokens", True) else "latent_maps",
        legacy_head=True,
    )


def export_official_tokenizer_config(cfg: TokenizerConfig, use_vf: str = "dinov3") -> dict:
    """The official config tree (model.vq_model + dataset.preprocessing.crop_size) for our config; `use_vf`
    names the VF model when cfg.vf_align (its width must equal cfg.vf_dim). Raises on what has no official form."""
    check_official_layout(cfg)
    if cfg.vf_align and OFFICIAL_VF_DIMS.get(use_vf) != cfg.vf_dim:
        raise ValueError(
            f"tokenizer.vf_dim={cfg.vf_dim}: the official VF model {use_vf!r} has width "
            f"{OFFICIAL_VF_DIMS.get(use_vf)}; pass use_vf from {OFFICIAL_VF_DIMS}"
        )
    names = {size: name for name, size in OFFICIAL_VIT_SIZES.items()}
    vq = dict(
        codebook_size=cfg.codebook_size,
        token_size=cfg.code_dim,
        use_l2_norm=True,
        commitment_cost=cfg.commitment_cost,
        entropy_loss_ratio=0.0,
        vit_enc_model_size=names[(cfg.enc_width, cfg.enc_depth, cfg.enc_heads)],
        vit_dec_model_size=names[(cfg.dec_width, cfg.dec_depth, cfg.dec_heads)],
        vit_enc_patch_size=16,
        vit_dec_patch_size=16,
        rope_base_len=cfg.rope_theta,
        num_latent_tokens=cfg.num_tokens,
        num_min_tokens=cfg.min_tokens,
        test_num_latent_tokens=cfg.num_tokens,
        merge_tokens=cfg.hierarchy_stages > 1,
        hierarchy_stages=cfg.hierarchy_stages,
        reduction_ratio=0.5,
        residual_image_tokens=cfg.residual_image_tokens,
        residual_latent_tokens=cfg.latent_init == "residual_pool",
        learnable_latent_tokens=False,
        learnable_dec_image_tokens=cfg.image_queries == "learned",
        multi_quant=True,
        vae_encoder=True,
        drop_latent_tokens=cfg.drop_prob > 0,
        drop_prob=cfg.drop_prob,
        latent_hierarchy=True,
        is_legacy=True,
        encoder_feature_supervision=cfg.vf_align,
        decoder_feature_supervision=cfg.vf_align,
        learnable_dec_feat_tokens=True,
        use_vf=use_vf if cfg.vf_align else None,
        reverse_proj=True,
    )
    return {"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": cfg.resolution}}}
