"""Released checkpoints: where they are looked for, what a missing one says, and the params check on import."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants

from restok.config.training import Official
from restok.convert import released
from restok.convert.checkpoint import export_official_checkpoint, weights_file
from restok.models.generator import GeneratorConfig, HARGenerator
from restok.models.teacher import MissingWeightsError
from restok.hashing import sha256_file
from restok.weights import WeightsHashError

REPO = "org/released-gpt"
CFG = GeneratorConfig(
    dim=32, n_layer=2, n_head=2, vocab_size=16, num_tokens=8, num_classes=3, ar_token_num=2, spe_token_num=7
)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache, offline (as on CI)."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def _cache_snapshot(cache, model) -> str:
    """`model` in the official layout where snapshot_download keeps repo REPO at revision main; returns the sha256
    of its weights file (the pin)."""
    root = cache / f"models--{REPO.replace('/', '--')}"
    folder = export_official_checkpoint(model, root / "snapshots" / ("1" * 40))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("1" * 40)
    return sha256_file(weights_file(Path(folder)))


def test_missing_local_file_names_the_params_key(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        released.fetch(Official(repo_id=REPO, file=str(tmp_path / "nowhere")), "train_generator.official")
    assert "train_generator.official.file" in str(err.value) and str(tmp_path / "nowhere") in str(err.value)


def test_offline_without_the_cache_says_where_it_looked_and_how_to_get_it(hub_cache):
    with pytest.raises(MissingWeightsError) as err:
        released.fetch(Official(repo_id=REPO), "train_tokenizer.official")
    msg = str(err.value)
    assert REPO in msg and str(hub_cache / "models--org--released-gpt") in msg and "HF_HUB_OFFLINE" in msg
    assert f"huggingface-cli download {REPO}" in msg and "train_tokenizer.official.file" in msg


def test_hub_cache_snapshot_is_imported_exactly(hub_cache):
    torch.manual_seed(0)
    model = HARGenerator(CFG)
    pin = _cache_snapshot(hub_cache, model)
    imported, provenance = released.import_released(
        "generator", Official(repo_id=REPO, sha256=pin), "train_generator.official", CFG, "params.yaml:generator"
    )
    assert provenance["weights"].startswith(f"official:{REPO}@") and provenance["source"].startswith(str(hub_cache))
    for key, value in model.state_dict().items():
        assert torch.equal(imported.state_dict()[key], value), key


def test_params_must_describe_the_checkpoint_except_training_only_fields(hub_cache):
    spec = Official(repo_id=REPO, sha256=_cache_snapshot(hub_cache, HARGenerator(CFG)))
    dropout_only = dataclasses.replace(CFG, resid_dropout=0.3, token_dropout=0.0)  # training-only: accepted
    released.import_released("generator", spec, "train_generator.official", dropout_only, "params.yaml:generator")
    wrong = dataclasses.replace(CFG, n_layer=3, rope_base=500.0)
    with pytest.raises(ValueError) as err:
        released.import_released("generator", spec, "train_generator.official", wrong, "params.yaml:generator")
    assert "params.yaml:generator does not describe the released generator" in str(err.value)
    assert "n_layer: params 3, checkpoint 2" in str(err.value) and "rope_base: params 500.0" in str(err.value)


def test_released_weights_are_checked_against_the_pinned_sha256_before_import(hub_cache, tmp_path, monkeypatch):
    """From the hub a checkpoint is imported only when params pin its sha256 and the file has it; a local file is
    checked when a pin is given. Nothing is read before the check."""
    pin = _cache_snapshot(hub_cache, HARGenerator(CFG))
    cached = weights_file(hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("1" * 40))

    def must_not_import(*args, **kwargs):
        raise AssertionError("the checkpoint was read before its sha256 was checked")

    monkeypatch.setattr(released, "import_official_checkpoint", must_not_import)
    wrong = "f" * 64
    with pytest.raises(WeightsHashError) as err:
        released.import_released(
            "generator", Official(repo_id=REPO, sha256=wrong), "train_generator.official", CFG, "params.yaml:generator"
        )
    assert str(err.value) == (
        f"restok: the released generator: {cached} has sha256 {pin}, expected {wrong} "
        f"(train_generator.official.sha256); not used"
    )
    with pytest.raises(
        WeightsHashError,
        match=rf"the released generator: weights downloaded from the hub "
        rf"\({REPO}@main\) are used only with their sha256 pinned; set "
        rf"train_generator.official.sha256. The file {cached} has sha256 {pin}",
    ):
        released.import_released("generator", Official(repo_id=REPO), "train_generator.official", CFG, "g")
    with pytest.raises(WeightsHashError, match=rf"{cached} has sha256 {pin}, expected {wrong}"):
        released.import_released(
            "generator", Official(file=str(cached.parent), sha256=wrong), "train_generator.official", CFG, "g"
        )
    with pytest.raises(ValueError, match=r"official.sha256='ABC': must be null or a sha256"):
        Official(repo_id=REPO, sha256="ABC")
