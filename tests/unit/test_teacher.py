"""Teacher (frozen timm DINOv3) loading and features.

Run: .venv/bin/python -m pytest tests/unit/test_teacher.py -q

Pretrained weights cannot be had offline, so the tests write a weights file from a randomly initialised timm model
and load it through the real paths (a local file via pretrained_cfg_overlay, and a seeded HF cache with the
production `pretrained=True` call; docs/tooling.md, ecosystem §7-8). The loaded teacher must reproduce that model's own forward.
"""

import shutil

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from restok.losses.loss_config import LossConfig
from restok.losses.recon import TokenizerLoss
from restok.models import teacher as teacher_mod
from restok.models.teacher import MissingWeightsError, Teacher, load_timm_model
from restok.hashing import sha256_file
from restok.weights import WeightsHashError

NAME = "vit_small_patch16_dinov3.lvd1689m"
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def source(module_tmp):
    """A random DINOv3-S and its weights saved as safetensors (a stand-in for the real checkpoint)."""
    torch.manual_seed(1)
    model = timm.create_model(NAME, pretrained=False).eval()
    path = module_tmp("weights") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _reference(model, img):
    with torch.no_grad():
        tokens = model.forward_features((img - MEAN) / STD)
    return tokens[:, 0], tokens[:, 5:]


@pytest.fixture(scope="module")
def file_teacher(source):
    return Teacher(NAME, str(source[1]))


def test_weights_file_reproduces_source(source, file_teacher):
    model, path = source
    img = torch.rand(2, 3, 32, 48)
    cls, patches = file_teacher(img, grid=(2, 3))
    ref_cls, ref_patches = _reference(model, img)
    assert cls.shape == (2, 384) and patches.shape == (2, 6, 384)
    torch.testing.assert_close(cls, ref_cls, rtol=0, atol=0)
    torch.testing.assert_close(patches, ref_patches, rtol=0, atol=0)
    assert file_teacher.provenance == {"model": NAME, "weights": f"file:{path.resolve()}", "sha256": sha256_file(path)}


def _seed_hub_cache(hf_cache, path, revision="abc123", ref="main"):
    snapshot = hf_cache / f"models--timm--{NAME}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    shutil.copy(path, snapshot / "model.safetensors")
    (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
    (snapshot.parent.parent / "refs" / ref).write_text(revision)
    return snapshot / "model.safetensors"


def test_seeded_hub_cache_loads_the_pinned_file(source, hf_cache):
    model, path = source
    _seed_hub_cache(hf_cache, path)
    teacher = Teacher(NAME, sha256=sha256_file(path))
    img = torch.rand(2, 3, 32, 32)
    cls, patches = teacher(img)
    ref_cls, ref_patches = _reference(model, img)
    torch.testing.assert_close(cls, ref_cls, rtol=0, atol=0)
    torch.testing.assert_close(patches, ref_patches, rtol=0, atol=0)
    assert teacher.provenance == {
        "model": NAME,
        "weights": f"hub:timm/{NAME}@main/model.safetensors",
        "sha256": sha256_file(path),
    }


def test_hub_weights_are_used_only_at_their_pinned_sha256(source, hf_cache, monkeypatch):
    """A hub file is checked against the pin before anything reads it: a wrong pin and no pin both stop the load,
    naming the model, the file, the expected and the actual sha256; the pinned revision is the one fetched."""
    _, path = source
    cached = _seed_hub_cache(hf_cache, path, revision="def456", ref="v1")

    def must_not_read(*args, **kwargs):
        raise AssertionError("the weights were read before their sha256 was checked")

    monkeypatch.setattr(teacher_mod, "read_weights_file", must_not_read)
    actual, wrong = sha256_file(path), "0" * 64
    with pytest.raises(WeightsHashError) as err:
        Teacher(NAME, revision="v1", sha256=wrong)
    assert str(err.value) == (f"restok: {NAME}: {cached} has sha256 {actual}, expected {wrong} (vf.sha256); not used")
    with pytest.raises(
        WeightsHashError,
        match=rf"restok: {NAME}: weights downloaded from the hub "
        rf"\(timm/{NAME}@v1/model.safetensors\) are used only with their "
        rf"sha256 pinned; set vf.sha256. The file .*def456/model.safetensors "
        rf"has sha256 {actual}",
    ):
        Teacher(NAME, revision="v1")
    with pytest.raises(MissingWeightsError, match="refs/v2 containing <rev>"):  # another revision: not in the cache
        Teacher(NAME, revision="v2", sha256=actual)
    with pytest.raises(WeightsHashError, match=rf"{path.resolve()} has sha256 {actual}, expected {wrong}"):
        Teacher(NAME, str(path), sha256=wrong)  # a local file is checked when a pin is given


def test_grid_resize_shapes_and_frozen(file_teacher):
    teacher = file_teacher.train()
    img = torch.rand(3, 3, 40, 40, requires_grad=True)
    cls, patches = teacher(img, grid=(3, 2))
    assert teacher.feat_dim == 384 and teacher.num_prefix_tokens == 5
    assert cls.shape == (3, 384) and patches.shape == (3, 3 * 2, 384)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not patches.requires_grad
    with pytest.raises(ValueError, match="multiple of the patch"):
        teacher(img)


def test_missing_hub_weights_raise_before_building(hf_cache, monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError("create_model called before the weights check")

    monkeypatch.setattr(teacher_mod.timm, "create_model", must_not_build)
    with pytest.raises(MissingWeightsError) as err:
        Teacher(NAME, params_key="vf.weights")
    message = str(err.value)
    assert message.startswith(f"restok: pretrained weights for {NAME} not found")
    assert str(hf_cache / f"models--timm--{NAME}") in message
    assert "HF_HUB_OFFLINE=1" in message and "vf.weights=<file>" in message and "Pretrained weights" in message
    assert isinstance(err.value, FileNotFoundError)


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(MissingWeightsError, match=str(missing)):
        load_timm_model(NAME, str(missing), params_key="vf.weights")


def test_random_init_is_seeded_labelled_and_leaves_global_rng(source):
    state = torch.get_rng_state()
    same, prov = load_timm_model(NAME, "random-init", seed=1)  # the fixture model was built after manual_seed(1)
    assert torch.equal(torch.get_rng_state(), state)
    other, _ = load_timm_model(NAME, "random-init", seed=2)
    assert prov == {"model": NAME, "weights": "random-init(seed=1)"}
    for (name, p), q in zip(source[0].state_dict().items(), same.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(same.patch_embed.proj.weight, other.patch_embed.proj.weight)
    assert not same.training and not any(p.requires_grad for p in same.parameters())


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown timm model"):
        load_timm_model("not_a_model", "random-init")


class _OpensAFile:
    """Unpickling this runs code: builtins.open creates the file `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize(
    "key, build",
    [
        ("vf.weights", lambda path: Teacher(NAME, str(path))),
        (
            "train_tokenizer.loss.disc_weights",
            lambda path: TokenizerLoss(
                LossConfig(lpips_weight=0.0, gan_weight=0.5, disc_model="vit_tiny_patch16_224", disc_weights=str(path))
            ),
        ),
    ],
)
def test_a_weights_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path, key, build):
    ran, path = tmp_path / "ran", tmp_path / "weights.pth"
    torch.save({"patch_embed.proj.bias": torch.zeros(384), "extra": _OpensAFile(ran)}, path)
    torch.load(path, weights_only=False)  # what an unrestricted unpickler does with it
    assert ran.exists(), "the file must be one whose unpickling runs code"
    ran.unlink()
    with pytest.raises(ValueError) as e:
        build(path)
    assert f"{key}={path.resolve()}: refused" in str(e.value), str(e.value)
    assert not ran.exists()


def test_the_discriminator_weights_are_checked_against_their_pin(tmp_path):
    path = tmp_path / "disc.safetensors"
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    wrong = "3" * 64
    with pytest.raises(
        WeightsHashError,
        match=rf"restok: vit_tiny_patch16_224: {path} has sha256 {sha256_file(path)}, "
        rf"expected {wrong} \(train_tokenizer.loss.disc_sha256\); not used",
    ):
        TokenizerLoss(
            LossConfig(
                lpips_weight=0.0,
                gan_weight=0.5,
                disc_model="vit_tiny_patch16_224",
                disc_weights=str(path),
                disc_sha256=wrong,
            )
        )
    loss = TokenizerLoss(
        LossConfig(
            lpips_weight=0.0,
            gan_weight=0.5,
            disc_model="vit_tiny_patch16_224",
            disc_weights=str(path),
            disc_sha256=sha256_file(path),
        )
    )
    assert loss.provenance["discriminator"]["sha256"] == sha256_file(path)
