"""The cached teacher features (`cache_features` writes them, `train_tokenizer` reads them): format and reader.

`data/cache_features/<shard>.tar` mirrors one train image shard sample for sample (same `__key__`s); per sample and
view: `views.npy` (V, 4) int32 view boxes (left, top, side, flip in stored px), `cls.npy` (V, D) and `patches.npy`
(V, P, D) fp16 teacher tokens. `manifest.json` names the format, the teacher and its weights, and the sha256 of the
image shards' manifest it was computed from.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from restok.data.shards import MANIFEST

FORMAT = "restok-features-v1"
FIELDS = ("views.npy", "cls.npy", "patches.npy")


def npy_bytes(array: np.ndarray) -> bytes:
    """One array as the bytes of a .npy file (a tar member)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def read_features_manifest(features_dir: str | Path) -> dict:
    """`<features_dir>/manifest.json`, refused when missing or of another format."""
    path = Path(features_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run cache_features first (dvc repro cache_features)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; "
            f"rerun cache_features (dvc repro cache_features)"
        )
    return manifest


class TarIndex:
    """Random access to an uncompressed tar's samples: key -> {field: (offset, size)} (webdataset naming)."""

    def __init__(self, path: str | Path):
        self.path, self.members, self._file = str(path), {}, (None, None)
        with tarfile.open(self.path) as tar:  # reads the headers only; member data is skipped by seeking
            for m in tar:
                if m.isfile():
                    folder, base = os.path.split(m.name)
                    stem, _, field = base.partition(".")
                    self.members.setdefault(os.path.join(folder, stem), {})[field] = (m.offset_data, m.size)
        self.keys = list(self.members)

    def _handle(self):
        pid, handle = self._file
        if pid != os.getpid():  # one handle per process (DataLoader workers fork)
            self._file = (os.getpid(), open(self.path, "rb"))
        return self._file[1]

    def read(self, key: str, field: str) -> bytes:
        offset, size = self.members[key][field]
        f = self._handle()
        f.seek(offset)
        return f.read(size)

    def npy_row(self, key: str, field: str, row: int) -> np.ndarray:
        """Row `row` of the .npy member (V, ...) without reading the other rows."""
        offset, _ = self.members[key][field]
        f = self._handle()
        f.seek(offset)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, _, dtype = read_header[version](f)
        count = int(np.prod(shape[1:]))
        f.seek(f.tell() + row * count * dtype.itemsize)
        return np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype).reshape(shape[1:])

    def __getstate__(self):
        return {**self.__dict__, "_file": (None, None)}
