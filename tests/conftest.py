"""Shared pytest fixtures. Runs offline: hub lookups are disabled before any import of timm/huggingface_hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import shutil  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def vectors():
    """vectors("quantizer") -> the loaded npz from tests/data/."""
    cache = {}

    def load(name: str):
        if name not in cache:
            cache[name] = np.load(DATA / f"{name}.npz")
        return cache[name]

    return load


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


REPO = Path(__file__).resolve().parents[1]
# tests/<kind>/, each kind a marker (pyproject.toml): unit (library code), stage (whole stages, kill -9 resume),
# pipeline (DVC and Snakemake on the smoke profile), slurm (the workflow through fake SLURM executables)
KINDS = ("unit", "stage", "pipeline", "slurm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its folder's kind (`pytest -m unit`, `-m "not pipeline and not slurm"`)."""
    here = Path(__file__).resolve().parent
    for item in items:
        parts = Path(item.path).resolve().relative_to(here).parts
        if len(parts) < 2 or parts[0] not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in tests/<kind>/, kind one of {KINDS}")
        item.add_marker(getattr(pytest.mark, parts[0]))


_FAILED_MODULES: set[str] = set()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _FAILED_MODULES.add(report.nodeid.split("::")[0])


@pytest.fixture(scope="module")
def module_tmp(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """module_tmp(name) -> a new directory for a module-scoped fixture. All of them are deleted when the module
    ends unless one of its tests failed (pyproject's tmp_path_retention_policy does the same for tmp_path), so the
    suite's disk use peaks at its largest module (test_official: 1.2 GB) instead of the sum of all."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.node.nodeid not in _FAILED_MODULES:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def smoke_params(tmp_path_factory) -> Path:
    """The smoke profile written to a params file (workflow/params/smoke.yaml over default.yaml)."""
    from restok.config.profiles import write_profile

    return write_profile("smoke", tmp_path_factory.mktemp("params") / "params.yaml")


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory, smoke_params) -> Path:
    """data/shard of the smoke profile (4 classes, 32 px, 48 train / 24 val images), built once per session."""
    from restok.stages import shard

    root = tmp_path_factory.mktemp("smoke")
    shard.main(
        ["--params", str(smoke_params), "--out", str(root / "data/shard"), "--results", str(root / "results/shard")]
    )
    return root / "data/shard"
