"""The whole-file check: every section of params.yaml, the rules that span sections, the ablation variants.

`validate` runs before any stage does work (`restok.config.load.load_params`), in `restok validate`, `restok profile`
and `restok ablate`: unknown keys, missing keys, wrong types, enum values and ranges (field metadata
`minimum`/`maximum`, plus each dataclass's `__post_init__`) all raise `ParamsError` naming `file:key`, the value and
what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from restok.config.ablations import variant_tree
from restok.config.engine import ParamsError, convert, read_yaml
from restok.config.generator import generator_config
from restok.config.sections import SECTIONS
from restok.config.tokenizer import tokenizer_config


def _cross_check(tree: dict, path, raw: dict | None = None) -> None:
    """Rules that span sections, checked before any stage runs."""
    if raw is not None:
        for name in tree["ablations"].variants:
            try:
                variant = variant_tree(raw, name)
            except ParamsError as e:
                raise ParamsError(f"{path}:{e}") from None
            validate(variant, f"{path}:ablations.variants.{name}", check_variants=False)
    data, tok_section = tree["data"], tree["tokenizer"]
    imported = {stage: tree[stage].official is not None for stage in ("train_tokenizer", "train_generator")}
    if "val" not in tree["shard"].splits:
        raise ParamsError(f"{path}:shard.splits: {tree['shard'].splits} leaves out val, which every evaluation reads")
    if "train" not in tree["shard"].splits and not all(imported.values()):
        raise ParamsError(
            f"{path}:shard.splits: {tree['shard'].splits} leaves out train, which training reads; "
            f"leave it out only when train_tokenizer.official and train_generator.official are set"
        )
    if imported["train_generator"] and not imported["train_tokenizer"]:
        raise ParamsError(
            f"{path}:train_generator.official is set but train_tokenizer.official is null: a released "
            f"generator predicts the codes of its own released tokenizer"
        )
    try:
        tok = tokenizer_config(tok_section, data.resolution, 8 if tok_section.vf_align else None)
    except ValueError as e:
        raise ParamsError(f"{path}:tokenizer (with data.resolution={data.resolution}): {e}") from None
    try:
        generator_config(tree["generator"], tok.codebook_size, tok.num_tokens, data.num_classes)
    except ValueError as e:
        raise ParamsError(f"{path}:generator (with the tokenizer's {tok.num_tokens} tokens): {e}") from None


def validate(data: dict, path: str | Path, check_variants: bool = True) -> dict[str, Any]:
    """Validate a whole params tree; returns {section: dataclass | value}."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: unknown top-level key(s) {unknown}; allowed: {sorted(SECTIONS)}")
    missing = sorted(set(SECTIONS) - set(data))
    if missing:
        raise ParamsError(f"{path}: missing top-level key(s) {missing}")
    tree = {name: convert(tp, data[name], f"{path}:{name}") for name, tp in SECTIONS.items()}
    _cross_check(tree, path, data if check_variants else None)
    return tree


def check_file(path: str | Path) -> dict[str, Any]:
    """The full check of a params file (`restok validate`): every section, the cross-section rules, and every
    ablation variant composed on it and validated as a whole file."""
    return validate(read_yaml(path), path)
