"""Read and write checkpoints in the official Kwai-Kolors/ResTok layout (the released hub files).

Released layout (huggingface_hub `PyTorchModelHubMixin`, as the official `ResTok` / `Transformer` classes use it):
a folder with `model.safetensors` (older hub versions and the training runs: `pytorch_model.bin`, a plain
`torch.save` of the state dict, possibly with torch.compile's `_orig_mod.` prefix) and `config.json`. The
tokenizer's config.json is the whole OmegaConf tree (`model.vq_model`, `dataset.preprocessing.crop_size`, ...);
the generator's is its `ModelArgs` (dim, n_layer, ..., block_size, spe_token_num). The training YAMLs under the
official `configs/` are accepted as well.

    model, cfg, provenance = import_official_checkpoint("restok_l_128.r256_in1k/", kind="tokenizer")
    export_official_checkpoint(model, "out/restok_official/")   # raises naming a switch with no official form
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import yaml

from restok.convert.official import (
    GENERATOR_SKIP,
    export_official_generator_config,
    export_official_generator_state,
    load_official_generator_state,
    official_generator_config,
)
from restok.convert.tokenizer import (
    TOKENIZER_SKIP,
    export_official_tokenizer_config,
    export_official_tokenizer_state,
    load_official_tokenizer_state,
    official_tokenizer_config,
)
from restok.hashing import sha256_file
from restok.models.generator import GeneratorConfig, HARGenerator
from restok.models.tokenizer import ResTok, TokenizerConfig

Kind = Literal["tokenizer", "generator"]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # looked up in this order inside a folder
PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers, stripped as the official loader does
WRAPPERS = ("state_dict", "model", "module")  # a state dict nested one level down in a training checkpoint


def weights_file(path: Path) -> Path:
    """The weights file of a released folder (model.safetensors, else pytorch_model.bin), or `path` itself."""
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: no {' or '.join(WEIGHT_FILES)} (pass the weights file itself)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .bin / .pt / .pth file on the CPU (no pickled code is executed)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix not in (".bin", ".pt", ".pth"):
        raise ValueError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors, .bin, .pt or .pth")
    return torch.load(path, map_location="cpu", weights_only=True)


def _plain_state_dict(obj: Mapping) -> tuple[dict[str, torch.Tensor], str | None]:
    """Unwrap one nesting level and strip wrapper prefixes; returns the state dict and the stripped prefix."""
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [key for key in WRAPPERS if isinstance(obj.get(key), Mapping)]
        if not nested:
            raise ValueError(
                f"not a state dict: top-level keys {sorted(obj)[:8]}; expected tensors or one of {WRAPPERS}"
            )
        obj = obj[nested[0]]
    for prefix in PREFIXES:
        if obj and all(k.startswith(prefix) for k in obj):
            return {k[len(prefix) :]: v for k, v in obj.items()}, prefix
    return dict(obj), None


def read_official_config(source: str | Path | Mapping) -> dict:
    """An official config from a dict, or a .json / .yaml file."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def import_official_checkpoint(
    source: str | Path | Mapping[str, torch.Tensor],
    kind: Kind,
    config: str | Path | Mapping | None = None,
    skip: Sequence[str] | None = None,
) -> tuple[ResTok | HARGenerator, TokenizerConfig | GeneratorConfig, dict]:
    """Build our model from an official checkpoint, exactly or not at all.

    Args:
        source: a hub folder (model.safetensors or pytorch_model.bin + config.json), a weights file, or a state
            dict already in memory.
        kind: "tokenizer" or "generator".
        config: the official config (dict, .json or .yaml path); default: config.json next to the weights.
        skip: glob patterns of official keys to ignore (default: the VF teacher for the tokenizer, a saved KV
            cache for the generator); every skipped key is named in the provenance.

    Returns:
        (model in eval mode, its config dataclass, provenance: a JSON-ready dict with the source, the weights'
        sha256, the official config used, the skipped keys and the parameter count).
    """
    if kind not in ("tokenizer", "generator"):
        raise ValueError(f"kind={kind!r}; allowed: tokenizer, generator")
    provenance: dict = {"kind": kind}
    if isinstance(source, Mapping):
        raw, provenance["source"] = source, "<state dict>"
    else:
        weights = weights_file(Path(source))
        raw = read_state_dict(weights)
        provenance.update(source=str(weights), sha256=sha256_file(weights))
        if config is None and (weights.parent / "config.json").is_file():
            config = weights.parent / "config.json"
    if config is None:
        raise ValueError(f"no official config for {provenance['source']}: pass config= (a dict or a .json/.yaml path)")
    state, provenance["stripped_prefix"] = _plain_state_dict(raw)
    official_cfg = read_official_config(config)
    provenance["config_source"] = "<dict>" if isinstance(config, Mapping) else str(config)
    if kind == "tokenizer":
        cfg = official_tokenizer_config(official_cfg)
        model = ResTok(cfg)
        skipped = load_official_tokenizer_state(model, state, TOKENIZER_SKIP if skip is None else skip)
    else:
        cfg = official_generator_config(official_cfg)
        model = HARGenerator(cfg)
        skipped = load_official_generator_state(model, state, GENERATOR_SKIP if skip is None else skip)
    provenance.update(
        official_config=official_cfg, skipped_keys=skipped, num_params=sum(p.numel() for p in model.parameters())
    )
    return model.eval(), cfg, provenance


def export_official_checkpoint(
    model: ResTok | HARGenerator,
    out_dir: str | Path,
    use_vf: str = "dinov3",
    weights_format: Literal["safetensors", "bin"] = "safetensors",
) -> Path:
    """Write `model` as an official hub folder (weights + config.json); returns the folder. `use_vf` names the
    tokenizer's VF model in the config. Raises ValueError naming the first setting with no official form."""
    if isinstance(model, ResTok):
        config, state = export_official_tokenizer_config(model.cfg, use_vf), export_official_tokenizer_state(model)
    elif isinstance(model, HARGenerator):
        config, state = export_official_generator_config(model.cfg), export_official_generator_state(model)
    else:
        raise TypeError(f"cannot export {type(model).__name__}: expected ResTok or HARGenerator")
    if weights_format not in ("safetensors", "bin"):
        raise ValueError(f"weights_format={weights_format!r}; allowed: safetensors, bin")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out / WEIGHT_FILES[0]))
    else:
        torch.save(state, out / WEIGHT_FILES[1])
    (out / "config.json").write_text(json.dumps(config, indent=4))
    return out
