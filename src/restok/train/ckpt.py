"""Atomic checkpoints for resume after kill -9, and the final model artifact (STYLE.md section 5, DESIGN.md).

Resume state lives in `data/train_<x>/ckpt/step_<step>.pt`: model, EMA, optimizers, step, the RNG state of every
rank and the data position. Files are written to `<name>.tmp.<pid>` in the same folder, fsynced, renamed with
os.replace and the folder fsynced, so a killed writer never leaves a file that `latest()` takes for a checkpoint.
Everything is stored as tensors, ints, floats, strings, lists and dicts, so `torch.load(weights_only=True)` reads it
(numpy RNG states are converted; notes/ecosystem.md section 6).

Loop usage (rank 0 saves, every rank restores its own RNG stream):
    path = ckpt.latest(ckpt_dir)
    if path: step, data_pos = ckpt.restore(ckpt.load(path), model, optimizers, ema)
    ...
    state = ckpt.capture(step, model, optimizers, ema, data=data_pos)   # collective: call it on every rank
    if info.is_main: ckpt.save(ckpt_dir, state, step, keep=3)
    dist.barrier()
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from restok.train.dist import is_dist, unwrap
from restok.train.ema import EMA

ARTIFACT_FORMAT = "restok-artifact-v1"
_CKPT_NAME = re.compile(r"^step_(\d+)\.pt$")


def save_atomic(obj: object, path: str | Path) -> None:
    """torch.save `obj` to `path` so that `path` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on one filesystem
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def rng_state() -> dict:
    """This process's RNG states (torch CPU, CUDA if available, numpy, python) as weights_only-loadable values."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"].tolist()), py_state["gauss"]))


def capture(step: int, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer], ema: EMA | None = None,
            data: dict | None = None, **extra) -> dict:
    """The resume state at `step` (the number of finished optimiser steps). Collective under torchrun.

    Args:
        step: finished optimiser steps; training continues at this step.
        model: the trained model (DDP/compile wrappers are unwrapped).
        optimizers: by name, e.g. {"tokenizer": opt_g, "discriminator": opt_d}.
        ema: the EMA, if the stage keeps one.
        data: the data position (samples consumed, shard epoch, ...) as plain values.
        extra: further plain values, e.g. disc_step=... (the LR follows from the steps: lr.lr_at is pure).
    """
    rng = [rng_state()]
    if is_dist():  # every rank's stream, so that each rank resumes its own augmentations and dropout
        rng = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(rng, rng_state())
    return {
        "step": int(step),
        "model": unwrap(model).state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "rng": rng,
        "data": data or {},
        **extra,
    }


def restore(state: dict, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
            ema: EMA | None = None) -> tuple[int, dict]:
    """Load `state` (from `capture`) into the given objects; returns (step, data position).

    Each rank restores its own RNG stream when the checkpoint was written by as many processes as run now; with a
    different world size the caller's seeding stays, and the run continues correctly but not bit-identically.
    """
    unwrap(model).load_state_dict(state["model"])
    if set(optimizers) != set(state["optimizers"]):
        raise ValueError(f"checkpoint has optimizers {sorted(state['optimizers'])}, the stage has {sorted(optimizers)}")
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    if ema is not None:
        if state["ema"] is None:
            raise ValueError("the stage keeps an EMA but the checkpoint has none")
        ema.load_state_dict(state["ema"])
    rank, world_size = (torch_dist.get_rank(), torch_dist.get_world_size()) if is_dist() else (0, 1)
    if len(state["rng"]) == world_size:
        set_rng_state(state["rng"][rank])
    return state["step"], state["data"]


def save(ckpt_dir: str | Path, state: dict, step: int, keep: int = 2) -> Path:
    """Write `ckpt_dir/step_<step>.pt` atomically, then keep only the newest `keep` checkpoints. Rank 0 only."""
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1 (checkpoints to keep)")
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / f"step_{step:09d}.pt"
    save_atomic(state, path)
    for old in _checkpoints(ckpt_dir)[:-keep]:
        old.unlink()
    for stale in ckpt_dir.glob("*.tmp.*"):  # left by a writer killed mid-write
        stale.unlink(missing_ok=True)
    return path


def fingerprint(*parts) -> str:
    """A short hash of what a training run is (model config, training params, input artifacts' identity)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resume_point(ckpt_dir: str | Path, run_fingerprint: str, is_main: bool = True) -> Path | None:
    """The newest checkpoint of *this* run, or None. Checkpoints of another run (a changed param or upstream
    artifact; DVC and Snakemake keep the folder across reruns) are removed so training starts over cleanly."""
    path = latest(ckpt_dir)
    if path is None:
        return None
    found = load(path).get("fingerprint")
    if found == run_fingerprint:
        return path
    if is_main:
        print(f"{ckpt_dir}: checkpoints belong to another run (fingerprint {found} != {run_fingerprint}); "
              f"starting over", flush=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return None


def latest(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `ckpt_dir`, or None (temporary files are never returned)."""
    found = _checkpoints(Path(ckpt_dir))
    return found[-1] if found else None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    named = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _CKPT_NAME.match(p.name))]
    return [p for _, p in sorted(named)]


def save_artifact(path: str | Path, state_dict: dict, config: dict, provenance: dict) -> None:
    """The final model file: EMA weights, the model config as a dict and provenance (params hash, step, weights).

    Downstream stages rebuild the model from `config`, never from params.yaml.
    """
    _check_plain(config, "config")
    _check_plain(provenance, "provenance")
    save_atomic({"format": ARTIFACT_FORMAT, "state_dict": state_dict, "config": config, "provenance": provenance},
                path)


def load_artifact(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict, dict]:
    """(state_dict, config, provenance) of a file written by `save_artifact`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model artifact {path} does not exist; run the stage that writes it first")
    obj = torch.load(path, map_location=map_location, weights_only=True)
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
