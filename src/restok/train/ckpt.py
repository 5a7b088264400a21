"""Resume state of the training stages: atomic checkpoints, and one resume rule that never resurrects stale state.

Resume state lives in `data/train_<x>/ckpt/step_<step>.pt`: model, EMA, optimizers, step, the RNG state of every
rank, the data position and the run's fingerprint. Files are written under a temporary name, fsynced and renamed
(restok.io.save_torch_atomic), so a killed writer never leaves a file that `latest()` takes for a checkpoint.
Everything is stored as tensors, ints, floats, strings, lists and dicts, so `torch.load(weights_only=True)` reads it
(numpy RNG states are converted; docs/tooling.md, ecosystem §6).

The fingerprint (`fingerprint`) covers what shapes the result: the params without logging and checkpointing knobs
(`run_params`), the code of every module the stage imports, the input artifacts and the library versions. So the
checkpoint a finished run leaves at `max_steps` is resumed only by the same run (a rerun after a logging param
change publishes the same weights without training again); any other run moves it aside and trains afresh.

Environment changes that restart training (they change the fingerprint): another Python minor version (3.11 ->
3.12; a patch release, 3.11.7 -> 3.11.9, does not), another torch version or build (2.14.1+cu130 -> 2.14.1+cpu),
another numpy or torchvision version, and another number of processes (world size). The process count is part of
the run because the tokenizer's data stream is cut per rank (each rank reads its own slice of every epoch's
permutation and its position is counted per rank, so another count would skip or repeat images) and every rank's
dropout/augmentation RNG stream is stored per rank; the generator's global batch would survive another count, but
its per-rank RNG streams would not, so both stages keep one rule: a resumed run computes what an uninterrupted one
computes (bit for bit on CPU). Other machines, thread counts and devices of the same versions resume.

Only a checkpoint whose content is bad (a zip or unpickling error, not a resume state) is moved aside; an error of
the filesystem or the machine while reading (OSError: EIO, ESTALE, ENOSPC, a vanished file; out of memory) stops
the stage with that error and every checkpoint stays where it is.

One writer per folder: a stage holds `exclusive(ckpt_dir)` (an flock on `<out>/ckpt.lock`) for its whole training,
so two runs never prune and move aside each other's checkpoints; a second writer stops at once, naming the holder.

Loop usage (both training stages):
    run = ckpt.fingerprint(ckpt.run_params(sections, LOGGING_KNOBS), "restok.stages.<stage>", inputs)
    state = ckpt.resume(ckpt_dir, run, info.is_main)       # collective under torchrun: rank 0 chooses
    if state: step, data_pos = ckpt.restore(state, model, optimizers, ema)
    ...
    state = ckpt.capture(step, model, optimizers, ema, data=data_pos, fingerprint=run)  # collective
    if info.is_main: ckpt.save(ckpt_dir, state, step, keep=3)
    dist.barrier()
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import pickle
import random
import re
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from restok.deps import code_sha256
from restok.io import save_torch_atomic
from restok.launch import stop_without_restart
from restok.train.dist import is_dist, unwrap
from restok.train.ema import EMA

_CKPT_NAME = re.compile(r"^step_(\d+)\.pt$")
# sets of checkpoints kept in ckpt/aside/ (a set: what one resume moved aside); older sets are deleted, so the folder
# holds at most 2 x keep_ckpts old checkpoints (plus any unreadable ones) whatever the number of reruns
KEEP_ASIDE = 2


class CheckpointDirLocked(RuntimeError):
    """Another process is training into the same checkpoint folder."""


@contextmanager
def exclusive(ckpt_dir: str | Path, take: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `ckpt_dir` (fcntl.flock on `<ckpt_dir>.lock`, beside it) for the `with` block.

    The holder writes its host, pid, SLURM job id (when set) and start time into the lock file; a second writer
    stops at once with CheckpointDirLocked naming them. The kernel drops the lock with the process (kill -9
    included), so a dead holder never blocks a rerun. On a shared filesystem the lock needs flock across nodes
    (NFS, Lustre mounted with -o flock); where flock is not supported the stage stops with that error. `take` False
    (every rank but 0): nothing is locked.
    """
    if not take:
        yield
        return
    path = Path(f"{ckpt_dir}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown (not written yet)"
            raise CheckpointDirLocked(
                f"{ckpt_dir} is in use by another training run: {holder} (lock {path}). Two "
                f"writers would delete and move aside each other's checkpoints; wait for it "
                f"or stop it, then rerun"
            ) from None
        job = os.environ.get("SLURM_JOB_ID")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            (
                f"host {socket.gethostname()}, pid {os.getpid()}"
                + (f", SLURM job {job}" if job else "")
                + f", since {stamp}\n"
            ).encode(),
            0,
        )
        yield
    finally:
        os.close(fd)  # releases the lock


def rng_state() -> dict:
    """This process's RNG states (torch CPU, CUDA if available, numpy, python) as weights_only-loadable values."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"].tolist()), py_state["gauss"]))


def capture(
    step: int,
    model: nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    ema: EMA | None = None,
    data: dict | None = None,
    **extra,
) -> dict:
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


def restore(
    state: dict, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer], ema: EMA | None = None
) -> tuple[int, dict]:
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
    try:
        save_torch_atomic(state, path)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        message = (
            f"cannot write checkpoint {path}: {e.strerror} ({errno.errorcode[e.errno]}); "
            f"free space in {ckpt_dir} (or lower loop.keep_ckpts) and rerun: the run resumes from the last "
            f"checkpoint"
        )
        stop_without_restart(message)
        raise OSError(e.errno, message) from e
    for old in _checkpoints(ckpt_dir)[:-keep]:
        old.unlink()
    for stale in ckpt_dir.glob("*.tmp.*"):  # left by a writer killed mid-write
        stale.unlink(missing_ok=True)
    return path


# keys of a training section (train_tokenizer, train_generator) that change how a run logs, checkpoints or spends
# memory, not what it computes (resume is exact across checkpoint intervals, tests/stage/test_stage_train_*.py;
# activation checkpointing gives the same values and gradients, tests/unit/test_speed.py): a run that ran out of
# memory resumes with checkpointing on
LOGGING_KNOBS = (
    "loop.ckpt_every_steps",
    "loop.keep_ckpts",
    "loop.log_every_steps",
    "loop.workers",
    "loop.checkpointing",
)


def run_params(sections: dict, ignore: Iterable[str]) -> dict:
    """The params that shape a training run's result: `sections` (name -> dict) without the dotted keys `ignore`
    (logging and checkpointing knobs). An ignored key that does not exist is refused (a renamed knob would
    otherwise silently start to count)."""
    tree = json.loads(json.dumps(sections, default=str))  # a deep, plain copy
    for dotted in ignore:
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise KeyError(f"run_params: ignored key {dotted!r} is not in the params sections {sorted(sections)}")
        del node[leaf]
    return tree


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(params: dict, module: str, inputs: dict) -> dict[str, str]:
    """What a training run is, part by part: a checkpoint is resumed only when every part is equal.

    Args:
        params: the params that shape the result (`run_params`).
        module: the stage module; its code part hashes every file it imports (restok.deps.code_sha256), so a
            checkpoint of older code is never resumed.
        inputs: identity of the input artifacts and of the process layout (manifest hashes, world size, ...).
    Returns:
        {"params", "code", "inputs", "environment"} -> short hashes; "environment" covers the Python minor version
        (not its patch release) and the torch, torchvision and numpy versions.
    """
    env = {
        "python": "{}.{}".format(*sys.version_info[:2]),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torchvision": importlib.metadata.version("torchvision"),
    }
    return {"params": _sha(params), "code": code_sha256(module)[:16], "inputs": _sha(inputs), "environment": _sha(env)}


def resume(ckpt_dir: str | Path, run: dict[str, str], is_main: bool = True) -> dict | None:
    """The state of the newest loadable checkpoint of *this* run (`fingerprint`), or None to start afresh.

    Rank 0 chooses and broadcasts the file, so every rank resumes the same step even where their views of a
    shared folder differ. No checkpoint is deleted on the spot: an unreadable checkpoint (killed mid-save on a
    filesystem without atomic rename, bad content) is moved to `ckpt/aside/` and the previous one is tried (an I/O or
    memory error while reading propagates instead, moving nothing); checkpoints of another run (a changed param,
    code, input or library; DVC and Snakemake keep the folder across reruns) are all moved to `ckpt/aside/` with a
    message naming what differs. What one resume moves forms one set, `ckpt/aside/<UTC time>-<why>/`; only the
    newest KEEP_ASIDE (2) sets are kept, older ones are deleted with a message, so the disk use stays bounded.
    """
    ckpt_dir = Path(ckpt_dir)
    chosen = _choose(ckpt_dir, run) if is_main else None
    if is_dist():
        box = [None if chosen is None else str(chosen)]
        torch_dist.broadcast_object_list(box, src=0)
        chosen = None if box[0] is None else Path(box[0])
    return load(chosen) if chosen is not None else None


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that loads, but not to a resume state (not a dict, or without its step or fingerprint)."""


RESUME_KEYS = ("step", "fingerprint")


def _fingerprint_of(path: Path) -> dict:
    state = load(path)
    if not isinstance(state, dict):
        raise UnreadableCheckpoint(f"it holds a {type(state).__name__}, not a resume state")
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise UnreadableCheckpoint(f"it lacks {missing}")
    return state["fingerprint"]


def _bad_content(err: Exception) -> bool:
    """Whether a load error says the file's content is bad (zip or unpickling errors, not a resume state), not that
    reading it failed: OSError (EIO, ESTALE, ENOSPC, ...) and running out of memory, which torch reports on the CPU as
    a RuntimeError "can't allocate memory", are not."""
    if isinstance(err, RuntimeError) and (isinstance(err, torch.OutOfMemoryError) or "allocate memory" in str(err)):
        return False
    return isinstance(err, (RuntimeError, EOFError, pickle.UnpicklingError, UnreadableCheckpoint))


def _choose(ckpt_dir: Path, run: dict[str, str]) -> Path | None:
    aside = None  # one set of ckpt/aside/ for everything this resume moves
    for path in reversed(_checkpoints(ckpt_dir)):
        try:
            found = _fingerprint_of(path)
        except Exception as e:
            if not _bad_content(e):  # I/O or memory: stop here, nothing moved
                raise
            aside = _move_aside(ckpt_dir, [path], "corrupt", f"{path} cannot be read ({type(e).__name__}: {e})", aside)
            continue
        if found == run:
            return path
        differs = sorted(k for k in run if not isinstance(found, dict) or found.get(k) != run[k])
        _move_aside(
            ckpt_dir,
            _checkpoints(ckpt_dir),
            "other-run",
            f"{ckpt_dir} holds checkpoints of another run ({', '.join(differs)} differ)",
            aside,
        )
        return None
    return None


def _move_aside(ckpt_dir: Path, paths: list[Path], why: str, message: str, dest: Path | None = None) -> Path:
    """Move `paths` into the set `dest` of ckpt/aside/ (None: a new set named by the UTC time and `why`), then delete
    all but the newest KEEP_ASIDE sets; returns the set."""
    aside = ckpt_dir / "aside"
    if dest is None:
        dest = aside / f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S.%f}-{why}"
    dest.mkdir(parents=True, exist_ok=True)
    for path in paths:
        os.replace(path, dest / path.name)
    print(
        f"{message}; moved {len(paths)} file(s) to {dest}, training does not resume from them",
        file=sys.stderr,
        flush=True,
    )
    for old in sorted(p for p in aside.iterdir() if p.is_dir())[:-KEEP_ASIDE]:  # names sort by time
        shutil.rmtree(old)
        print(f"deleted {old}: ckpt/aside/ keeps the newest {KEEP_ASIDE} sets", file=sys.stderr, flush=True)
    return dest


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
