"""What produced a result, kept beside it: every stage writes its numbers and its provenance as two files.

    write_results(results / "metrics.json", metrics, provenance, device)
      -> results/<stage>/metrics.json      numbers only (DVC `metrics:`; `dvc metrics diff` compares these)
      -> results/<stage>/provenance.json   strings, hashes, weights sources, timings and throughput, and the
                                           environment (lock hash, library versions, device, threads)

`dvc metrics diff` of two runs then shows what changed in the results, not dozens of rows of hashes and timings.
The provenance file is not declared as metrics: a stage's is a cached DVC out (an uncached one would cost the stage
its run-cache, dvc.yaml), score's results/provenance.json gathers the run's teacher, extractor, weights and
environment and is tracked in git. A value that is not a number (or a dict/list of
numbers) in `metrics` is refused, naming its key.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from restok.io import write_json_atomic

REPO = Path(__file__).resolve().parents[2]  # src/restok/provenance.py -> the repository (editable install)
LOCK_FILES = ("requirements/lock.txt", "requirements/weights.txt")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def lock_pins(root: Path = REPO) -> dict[str, str] | None:
    """{normalised name: version} of the lock files, or None where the lock is not there (a non-editable install)."""
    paths = [root / name for name in LOCK_FILES]
    if not all(p.is_file() for p in paths):
        return None
    return {
        _normalise(m.group(1)): m.group(2)
        for p in paths
        for line in p.read_text().splitlines()
        if (m := _PIN.match(line))
    }


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def environment(device: torch.device | str, root: Path = REPO) -> dict:
    """The software and hardware a result came from: lock hash, whether the installed packages match it (with the
    ones that do not), Python/torch versions, the device and the CPU threads (results are bitwise reproducible only
    for the same machine type and thread count; README, Reproducibility)."""
    device = torch.device(device)
    pins = lock_pins(root)
    lock = None
    if pins is not None:
        h = hashlib.sha256()
        for name in LOCK_FILES:
            h.update((root / name).read_bytes())
        installed = {_normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
        differ = sorted(
            f"{name}=={want} (installed: {installed.get(name, 'missing')})"
            for name, want in pins.items()
            if installed.get(name) != want
        )
        lock = {
            "sha256": h.hexdigest(),
            "files": list(LOCK_FILES),
            "matches_installed": not differ,
            "differences": differ,
        }
    return {
        "lock": lock,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "cpu": cpu_facts(),
    }


def cpu_facts() -> dict:
    """What makes CPU results differ between machines of one platform string: the CPU model, the kernels torch
    dispatches to (its CPU capability: AVX2, AVX512, ...; native bf16, which `precision: auto` follows), the math
    libraries' versions and whether deterministic algorithms were asked for. Two machines that differ here may give
    different bits from the same code and seeds (docs/experiments.md measured it)."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or None
    config = torch.__config__.show()
    libraries = {
        name: next(
            (
                ln.split(name, 1)[1].split("(")[0].split(" for ")[0].strip(" v")
                for ln in config.splitlines()
                if name in ln
            ),
            None,
        )
        for name in ("Math Kernel Library Version", "MKL-DNN")
    }
    return {
        "model": model,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
        "mkl": libraries["Math Kernel Library Version"],
        "onednn": libraries["MKL-DNN"],
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


# what makes two machines give other bits from the same code, seeds and lock (docs/experiments.md measured it)
MACHINE_KEYS = (
    ("cpu", "model"),
    ("cpu", "capability"),
    ("cpu", "native_bf16"),
    ("cpu", "mkl"),
    ("cpu", "onednn"),
    ("cpu", "deterministic_algorithms"),
    ("device_name",),
    ("cuda",),
    ("torch_threads",),
)


def committed_environment(results: str | Path, name: str = "provenance.json") -> dict | None:
    """The environment recorded in the committed (git HEAD) version of `results`/`name`: the machine of the run
    this one replaces. None when there is no such committed file (not a git checkout, never committed)."""
    try:
        shown = subprocess.run(
            ["git", "show", f"HEAD:./{name}"], cwd=results, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if shown.returncode != 0:
        return None
    try:
        env = json.loads(shown.stdout).get("environment")
    except (json.JSONDecodeError, AttributeError):
        return None
    return env if isinstance(env, dict) else None


def machine_differences(run: dict, committed: dict) -> list[str]:
    """Where the machine of environment `run` differs from that of `committed` ("cpu.model: 'A' here, 'B'
    committed", ...); a fact the committed run did not record reads as unknown there."""

    def get(env, path):
        for key in path:
            if not isinstance(env, dict) or key not in env:
                return "not recorded"
            env = env[key]
        return env

    out = []
    for path in MACHINE_KEYS:
        here, there = get(run, path), get(committed, path)
        if here != there:
            out.append(f"{'.'.join(path)}: {here!r} here, {there!r} committed")
    return out


def check_numbers(obj, where: str) -> None:
    """Refuse anything but numbers, booleans and None (nested in dicts and lists): metrics files hold numbers."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            check_numbers(value, f"{where}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_numbers(value, f"{where}[{i}]")
    elif obj is not None and not isinstance(obj, (int, float)):
        raise TypeError(f"{where} = {obj!r} is not a number: metrics hold numbers only; put it in the provenance")


def split_numbers(tree: dict) -> tuple[dict, dict]:
    """(the numeric leaves of `tree`, everything else), both keeping the nesting; for results assembled by library
    functions that mix numbers with their provenance (e.g. a FID with the extractor that measured it)."""
    numbers, others = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            n, o = split_numbers(value)
            if n:
                numbers[key] = n
            if o:
                others[key] = o
        elif value is None or isinstance(value, (int, float)):
            numbers[key] = value
        else:
            others[key] = value
    return numbers, others


def read_results(metrics_path: str | Path) -> dict:
    """A stage's metrics with its provenance (environment aside) merged in; {} when the metrics are missing or
    unreadable (a headline then leaves those numbers null)."""
    merged = {}
    for path in (Path(metrics_path).with_name("provenance.json"), Path(metrics_path)):
        try:
            merged = _merge(merged, json.loads(path.read_text()))
        except (OSError, ValueError):
            if path == Path(metrics_path):
                return {}
    merged.pop("environment", None)
    return merged


def _merge(a: dict, b: dict) -> dict:
    """b over a, nested dicts merged (the inverse of split_numbers)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_results(metrics_path: str | Path, metrics: dict, provenance: dict, device: torch.device | str) -> None:
    """`metrics_path` (numbers only) and `provenance.json` beside it (`provenance` plus the environment).

    The provenance is written first: a metrics file on disk always has its provenance next to it.
    """
    metrics_path = Path(metrics_path)
    check_numbers(metrics, metrics_path.name)
    write_json_atomic(metrics_path.with_name("provenance.json"), {**provenance, "environment": environment(device)})
    write_json_atomic(metrics_path, metrics)
