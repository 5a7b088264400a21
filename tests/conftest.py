"""Shared pytest fixtures. Runs offline: hub lookups are disabled before any import of timm/huggingface_hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

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
