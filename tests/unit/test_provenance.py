"""Metrics files hold numbers only; provenance (with the environment) sits beside them.

    python -m pytest -q tests/unit/test_provenance.py

`dvc metrics diff` of two runs then lists quality numbers, not hashes, weights sources or timings. The environment
record names the lock and whether the installed packages match it; tests/stage/test_stage_train_generator.py shows
what reproduces (bitwise at a fixed thread count, within tolerance across thread counts).
"""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

from restok import provenance


def test_write_results_splits_numbers_from_provenance(tmp_path):
    provenance.write_results(
        tmp_path / "metrics.json",
        {"psnr": 20.5, "levels": {"level_0": 1.0}, "step": 6, "ok": True, "missing": None},
        {"teacher": "efficientnet", "seconds": 3.2},
        "cpu",
    )
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "psnr": 20.5,
        "levels": {"level_0": 1.0},
        "step": 6,
        "ok": True,
        "missing": None,
    }
    info = json.loads((tmp_path / "provenance.json").read_text())
    assert info["teacher"] == "efficientnet" and info["seconds"] == 3.2
    env = info["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["torch_threads"] == torch.get_num_threads() and env["cpu_count"] >= 1
    assert len(env["lock"]["sha256"]) == 64 and env["lock"]["files"] == list(provenance.LOCK_FILES)
    assert provenance.read_results(tmp_path / "metrics.json")["teacher"] == "efficientnet"


def test_a_string_in_metrics_is_refused_with_its_key(tmp_path):
    with pytest.raises(TypeError, match=r"metrics.json.teacher.weights = 'sha256:ab' is not a number"):
        provenance.write_results(tmp_path / "metrics.json", {"teacher": {"weights": "sha256:ab"}}, {}, "cpu")
    assert not list(tmp_path.iterdir())


def test_split_numbers_keeps_nesting_and_read_results_merges_back(tmp_path):
    tree = {"gfid": {"fid": 3.5, "extractor": "inception"}, "profile": "smoke", "n": 4, "tags": ["a"]}
    numbers, others = provenance.split_numbers(tree)
    assert numbers == {"gfid": {"fid": 3.5}, "n": 4}
    assert others == {"gfid": {"extractor": "inception"}, "profile": "smoke", "tags": ["a"]}
    provenance.write_results(tmp_path / "metrics.json", numbers, others, "cpu")
    assert provenance.read_results(tmp_path / "metrics.json") == tree
    assert provenance.read_results(tmp_path / "missing.json") == {}


def test_lock_differences_are_named(tmp_path):
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements/lock.txt").write_text(
        f"torch=={importlib.metadata.version('torch')} \\\n    --hash=sha256:00\nnot-installed-package==1.0\n"
    )
    (tmp_path / "requirements/weights.txt").write_text("")
    lock = provenance.environment("cpu", root=tmp_path)["lock"]
    assert not lock["matches_installed"]
    assert lock["differences"] == ["not-installed-package==1.0 (installed: missing)"]
    assert provenance.environment("cpu", root=tmp_path / "nowhere")["lock"] is None


def test_environment_names_what_makes_cpu_results_differ():
    cpu = provenance.environment("cpu")["cpu"]
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()  # e.g. AVX2 / AVX512: the kernels that ran
    assert cpu["native_bf16"] is bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert cpu["onednn"] and cpu["onednn"][0].isdigit() and cpu["deterministic_algorithms"] is False
    assert cpu["model"]
