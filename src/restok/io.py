"""Atomic writes shared by every stage (README.md: outputs appear only complete).

Each writer puts the bytes under `<name>.tmp.<pid>` in the destination folder and renames it with os.replace, so a
killed process leaves either the old file or the complete new one, never a half-written file that DVC, Snakemake or
a later stage takes as done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], durable: bool = False) -> None:
    """Call `write(f)` on a temporary file beside `path`, then rename it to `path`.

    Args:
        path: the destination; its folder is created.
        write: writes the whole content to the open binary file.
        durable: fsync the file and the folder (checkpoints: the rename survives a power loss too).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on one filesystem
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)


def save_torch_atomic(obj: object, path: str | Path) -> None:
    """torch.save `obj` to `path`, durably: `path` is either the old file or the complete new one."""
    write_atomic(path, lambda f: torch.save(obj, f), durable=True)


def write_json_atomic(path: str | Path, obj) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_npz_atomic(path: str | Path, **arrays) -> None:
    write_atomic(path, lambda f: np.savez(f, **arrays))


def save_png(image, path: str | Path, nrow: int = 8, padding: int = 1, dpi: float | None = None) -> None:
    """An image as one PNG, written atomically: a tensor (N, 3, H, W) or (3, H, W) in [0, 1], laid out as a grid by
    torchvision's save_image (`nrow`, `padding`), or a matplotlib Figure (`dpi`; None: the figure's)."""
    if hasattr(image, "savefig"):
        kwargs = {} if dpi is None else {"dpi": dpi}
        write_atomic(path, lambda f: image.savefig(f, format="png", **kwargs))
        return
    from torchvision.utils import save_image  # torchvision only where a stage writes pictures

    write_atomic(path, lambda f: save_image(image, f, format="png", nrow=nrow, padding=padding))
