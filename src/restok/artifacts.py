"""Model artifacts (`tokenizer.pt`, `generator.pt`): writing them, and loading them back with their provenance.

An artifact holds the EMA weights, the model config as a plain dict and provenance (params hash, step, teacher and
weights used). Downstream stages rebuild models from the stored config, never from params.yaml, and check facts
across artifacts (codebook size, token count), refusing a mismatch with both values.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from restok.io import save_torch_atomic
from restok.models.generator import GeneratorConfig, HARGenerator
from restok.models.tokenizer import ResTok, TokenizerConfig

ARTIFACT_FORMAT = "restok-artifact-v1"


def save_artifact(path: str | Path, state_dict: dict, config: dict, provenance: dict) -> None:
    """The final model file: EMA weights, the model config as a dict and provenance (params hash, step, weights).

    Downstream stages rebuild the model from `config`, never from params.yaml.
    """
    _check_plain(config, "config")
    _check_plain(provenance, "provenance")
    save_torch_atomic(
        {"format": ARTIFACT_FORMAT, "state_dict": state_dict, "config": config, "provenance": provenance}, path
    )


def load_artifact(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict, dict]:
    """(state_dict, config, provenance) of a file written by `save_artifact`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model artifact {path} does not exist; run the stage that writes it first")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:  # not a torch file, truncated, foreign objects
        if isinstance(e, RuntimeError) and (isinstance(e, torch.OutOfMemoryError) or "allocate memory" in str(e)):
            raise  # the machine, not the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"{path} is not a readable restok model artifact ({type(e).__name__}: {first[:200]}); "
            f"rerun the stage that writes it"
        ) from e
    if not isinstance(obj, dict) or obj.get("format") != ARTIFACT_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} is not a restok model artifact (format {found!r}, expected {ARTIFACT_FORMAT!r})")
    return obj["state_dict"], obj["config"], obj["provenance"]


def _check_plain(obj: object, where: str) -> None:
    """Refuse values torch.load(weights_only=True) or JSON would not read back (dataclasses, numpy scalars, ...)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} must be a string")
            _check_plain(value, f"{where}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif obj is not None and not isinstance(obj, (str, int, float, bool)):
        raise TypeError(f"{where} = {obj!r} ({type(obj).__name__}) must be a str, int, float, bool, None, list or dict")


def build_tokenizer(state: dict, config: dict, device: torch.device) -> ResTok:
    """The tokenizer of an artifact's (state_dict, config), eval mode, fp32."""
    model = ResTok(TokenizerConfig(**config))
    model.load_state_dict(state)
    return model.to(device).eval()


def load_tokenizer(path: str | Path, device: torch.device) -> tuple[ResTok, dict]:
    """(EMA tokenizer rebuilt from the config stored in a tokenizer.pt artifact, its provenance)."""
    state, config, provenance = load_artifact(path)
    return build_tokenizer(state, config, device), provenance


def load_models(
    generator_path: str | Path, tokenizer_path: str | Path, device: torch.device
) -> tuple[HARGenerator, ResTok, dict]:
    """Generator and tokenizer rebuilt from their artifacts, after checking that they belong together.

    Returns (generator, tokenizer, {"generator": provenance, "tokenizer": provenance}).
    """
    g_state, g_config, g_prov = load_artifact(generator_path)
    t_state, t_config, t_prov = load_artifact(tokenizer_path)
    g_cfg, t_cfg = GeneratorConfig(**g_config), TokenizerConfig(**t_config)
    for what, g_value, t_value in (
        ("vocab_size vs codebook_size", g_cfg.vocab_size, t_cfg.codebook_size),
        ("num_tokens vs tokens", g_cfg.num_tokens, t_cfg.num_tokens),
    ):
        if g_value != t_value:
            raise ValueError(
                f"generator {what}: {generator_path} has {g_value} but {tokenizer_path} has {t_value}; "
                f"the generator was trained on codes of another tokenizer"
            )
    generator = HARGenerator(g_cfg)
    generator.load_state_dict(g_state)
    tokenizer = build_tokenizer(t_state, t_config, device)
    return generator.to(device).eval(), tokenizer, {"generator": g_prov, "tokenizer": t_prov}
