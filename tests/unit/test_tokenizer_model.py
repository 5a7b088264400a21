"""ResTok model tests on a tiny config (32 px, 4x pixel CNN -> 8x8 grid, 32 tokens, 4 stages), docs/method.md, restok §5.1.

Run: .venv/bin/python -m pytest tests/unit/test_tokenizer_model.py -q
Shapes, prefix decoding, nested-dropout independence, the latent-init / merge / legacy-head invariants,
every ablation variant (forward + backward), and the paper-size parameter count on the meta device.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from restok.models.tokenizer import ResTok, TokenizerConfig, TokenizerOut
from restok.models.vit import ResTokEncoder, residual_pool_init

TINY = TokenizerConfig(
    resolution=32,
    pixel_channels=(32, 32, 32),
    pixel_res_blocks=1,
    pixel_z_channels=32,
    enc_width=32,
    enc_depth=4,
    enc_heads=2,
    dec_width=32,
    dec_depth=4,
    dec_heads=2,
    level_sizes=(1, 1, 2, 4, 8, 16),
    codebook_size=64,
    vf_dim=16,
)
L = TINY.num_tokens


def _model(**overrides) -> ResTok:
    return ResTok(dataclasses.replace(TINY, **overrides))


def _images(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, TINY.resolution, TINY.resolution)


@pytest.fixture(scope="module")
def eval_model() -> ResTok:
    """One eval-mode model shared by the read-only tests of this module (seeded, so independent of test order)."""
    torch.manual_seed(0)
    return _model().eval()


def test_forward_shapes_train_mode():
    model = _model().train()
    out = model(_images())
    assert isinstance(out, TokenizerOut)
    assert out.recon.shape == (2, 3, 32, 32) and out.recon.dtype == torch.float32
    assert out.codes.shape == (2, L) and out.codes.dtype == torch.long
    assert 0 <= out.codes.min() and out.codes.max() < TINY.codebook_size
    assert out.quant_loss.shape == () and out.quant_loss.dtype == torch.float32
    assert set(out.vq_losses) == {"commitment", "codebook"}
    assert out.enc_cls_feat.shape == (2, 16) and out.dec_patch_feat.shape == (2, 64, 16)
    assert set(out.n_keep.tolist()) <= set(TINY.keep_lengths)
    assert model.level_sizes == (1, 1, 2, 4, 8, 16) and model.num_tokens == 32 and model.image_grid == (8, 8)


@torch.no_grad()
def test_vf_dec_fraction_runs_feature_queries_for_the_leading_images_only(eval_model):
    """The switch only drops feature rows: reconstructions and the kept rows' features are unchanged."""
    x = _images(4)
    full = eval_model(x)
    part = ResTok(dataclasses.replace(TINY, vf_dec_fraction=0.25))
    part.load_state_dict(eval_model.state_dict())
    out = part.eval()(x)
    assert out.dec_patch_feat.shape == (1, 64, 16) and full.dec_patch_feat.shape == (4, 64, 16)
    torch.testing.assert_close(out.recon, full.recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.dec_patch_feat, full.dec_patch_feat[:1], rtol=1e-5, atol=1e-5)
    assert ResTok(dataclasses.replace(TINY, vf_dec_fraction=0.01))(x).dec_patch_feat.shape[0] == 1  # at least one
    with pytest.raises(ValueError, match="vf_dec_fraction"):
        dataclasses.replace(TINY, vf_dec_fraction=0.0)


@torch.no_grad()
def test_eval_forward_matches_encode_then_decode(eval_model):
    model = eval_model
    x = _images()
    out = model(x)
    codes = model.encode(x)
    assert torch.equal(codes, out.codes)
    assert out.n_keep.tolist() == [L, L]
    torch.testing.assert_close(model.decode(codes), out.recon, atol=1e-5, rtol=0)


@torch.no_grad()
def test_prefix_decoding_and_independence_from_dropped_codes(eval_model):
    model = eval_model
    codes = model.encode(_images())
    for n in TINY.keep_lengths:
        prefix = model.decode(codes[:, :n])
        assert prefix.shape == (2, 3, 32, 32)
        assert torch.equal(prefix, model.decode(codes, n_tokens=n))
    other = codes.clone()
    other[:, 4:] = torch.randint(0, TINY.codebook_size, (2, L - 4))
    assert torch.equal(model.decode(codes, 4), model.decode(other, 4))
    assert not torch.equal(model.decode(codes), model.decode(other))


@torch.no_grad()
def test_per_sample_keep_lengths(eval_model):
    model = eval_model
    x = _images()
    out = model(x, n_keep=torch.tensor([4, L]))
    torch.testing.assert_close(out.recon[:1], model.decode(out.codes[:1], 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.recon[1:], model.decode(out.codes[1:]), atol=1e-5, rtol=0)


def test_decode_refuses_bad_lengths(eval_model):
    model = eval_model
    codes = torch.zeros(1, L, dtype=torch.long)
    for bad in (0, L + 1):
        with pytest.raises(ValueError, match="n_tokens"):
            model.decode(codes, bad)


def test_nested_dropout_draw():
    model = _model().train()
    draws = model.draw_keep(4000)
    freq = torch.stack([(draws == n).float().mean() for n in TINY.keep_lengths])
    torch.testing.assert_close(freq, torch.tensor(TINY.keep_probs), atol=0.03, rtol=0)
    assert model.eval().draw_keep(5).tolist() == [L] * 5


def test_latent_init_invariants():
    model = _model()
    fmap = torch.randn(2, TINY.enc_width, 8, 8) * 3
    tol = 1e-5 * fmap.abs().max()
    tokens = model.encoder.latent_init(fmap)  # (B, L, D), before level embeddings
    torch.testing.assert_close(tokens, residual_pool_init(fmap, TINY.pool_grids), atol=0, rtol=0)
    levels = tokens.split(list(TINY.level_sizes), dim=1)
    assert levels[1].abs().max() < tol  # 0 up to fp32 rounding, never bit-exact by design
    for level in range(1, len(levels)):
        (h, w), (ph, pw) = TINY.pool_grids[level], TINY.pool_grids[level - 1]
        grid = levels[level].transpose(1, 2).unflatten(2, (h, w))  # (B, D, h, w)
        children_sum = F.avg_pool2d(grid, (h // ph, w // pw)) * (h // ph) * (w // pw)
        assert children_sum.abs().max() < tol  # children inside each parent cell sum to 0


@torch.no_grad()
def test_merge_invariants_inside_the_encoder():
    """In a merging block, after the subtraction and before the MLP: new group = old[0::2] bit for bit, the even
    residual tokens are exactly 0 and the odd ones are old[2i+1] - old[2i]."""
    model = _model().eval()
    enc, seen = model.encoder, {}
    for i in enc.merge_blocks:
        block = enc.blocks[i]
        block.merge.register_forward_pre_hook(lambda m, args, _i=i: seen.__setitem__(("attn", _i), args[0]))
        block.norm2.register_forward_pre_hook(lambda m, args, _i=i: seen.__setitem__(("ln2", _i), args[0]))
    enc(torch.randn(2, TINY.pixel_z_channels, 8, 8))
    n = 64
    for i in enc.merge_blocks:
        old, seq = seen[("attn", i)], seen[("ln2", i)]
        assert seq.shape[1] == old.shape[1] + n // 2
        assert torch.equal(seq[:, : n // 2], old[:, 0:n:2])
        residual = seq[:, n // 2 : n // 2 + n]
        assert torch.all(residual[:, 0::2] == 0)
        assert torch.equal(residual[:, 1::2], old[:, 1:n:2] - old[:, 0:n:2])
        assert torch.equal(seq[:, n // 2 + n :], old[:, n:])
        n //= 2


@pytest.mark.parametrize("legacy", [True, False])
@torch.no_grad()
def test_legacy_head_locality(legacy):
    """Perturb one scalar Y[token, channel] after ln_post: the legacy head changes only code position
    channel mod L; the transposed head only position `token`."""
    encoder = ResTokEncoder(dataclasses.replace(TINY, legacy_head=legacy)).eval()
    feat = torch.randn(1, TINY.pixel_z_channels, 8, 8)
    z0, _ = encoder(feat)
    for token, channel in ((0, 0), (5, 17), (31, 31), (12, 3)):

        def bump(module, args, out, token=token, channel=channel):
            out = out.clone()
            out[:, token, channel] += 1.0
            return out

        handle = encoder.ln_post.register_forward_hook(bump)
        z1, _ = encoder(feat)
        handle.remove()
        changed = ((z1 - z0).abs().amax(-1)[0] > 0).nonzero().flatten().tolist()
        assert changed == [channel % L if legacy else token]


VARIANTS = {
    "official": {},
    "no_residual_image_tokens": {"residual_image_tokens": False},
    "avgpool_merge": {"merge_op": "avgpool"},
    "plain_pool_init": {"latent_init": "pool"},
    "learned_hierarchical_latents": {"latent_init": "learned"},
    "flat_latents": {"latent_queries": "flat", "latent_init": "learned"},
    "latent_map_queries": {"image_queries": "latent_maps"},
    "latent_map_queries_mean": {"image_queries": "latent_maps", "latent_init": "pool"},
    "no_vf": {"vf_align": False},
    "transposed_head": {"legacy_head": False},
    "no_merging": {"hierarchy_stages": 1},
    "no_nested_dropout": {"drop_prob": 0.0},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_forward_backward(name):
    model = _model(**VARIANTS[name]).train()
    out = model(_images(), n_keep=torch.tensor([4, L]))
    loss = out.recon.square().mean() + out.quant_loss
    if out.enc_cls_feat is not None:
        loss = loss + out.enc_cls_feat.square().mean() + out.dec_patch_feat.square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert (out.enc_cls_feat is None) == (not model.cfg.vf_align)


def test_bf16_autocast_keeps_vq_and_pixel_decoder_fp32():
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_images())
    assert out.recon.dtype == torch.float32 and out.quant_loss.dtype == torch.float32


def test_paper_size_parameter_count_on_meta():
    """docs/method.md, restok §5.3: 659.694M without the VF parts, 661.792M with them (frozen teacher excluded)."""
    with torch.device("meta"):
        model = ResTok(TokenizerConfig(vf_align=False))
        with_vf = ResTok(TokenizerConfig())

    def millions(module):
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 3)

    assert millions(model) == 659.694
    assert (millions(model.pixel_encoder), millions(model.pixel_decoder)) == (23.775, 30.478)
    assert (millions(model.encoder), millions(model.decoder)) == (302.685, 302.690)
    assert model.quantizer.codebook.numel() == 65536
    assert millions(with_vf) == 661.792


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"level_sizes": (1, 2, 4)}, "level_sizes"),
        ({"merge_op": "max"}, "merge_op"),
        ({"hierarchy_stages": 5}, "hierarchy_stages"),  # width 8 cannot be halved 4 times
        ({"enc_depth": 3}, "hierarchy_stages"),
        ({"level_sizes": (1, 1, 2, 4, 8, 16, 32, 64, 128)}, "level_sizes"),  # 16x16 pooling on an 8x8 grid
        ({"latent_queries": "flat"}, "latent_queries"),
        ({"vf_dim": None}, "vf_align"),
        ({"drop_prob": 0.7}, "drop_prob"),
        ({"enc_heads": 3}, "enc_width"),
        ({"pixel_channels": (32, 48)}, "pixel_channels"),
        ({"resolution": 30}, "resolution"),
    ],
)
def test_config_refusals(overrides, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **overrides)


@pytest.mark.parametrize("weight_init", ["official", "fan_in"])
def test_weight_init_choices(weight_init):
    from restok.models.tokenizer import PRESETS

    cfg = dataclasses.replace(PRESETS["restok-smoke/8"], weight_init=weight_init, vf_align=False, vf_dim=None)
    model = ResTok(cfg)
    w = (
        model.pixel_encoder[0].weight
        if isinstance(model.pixel_encoder, torch.nn.Sequential)
        else next(m.weight for m in model.pixel_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    )
    fan_in = w[0].numel()
    expected = 0.02 if weight_init == "official" else fan_in**-0.5
    assert abs(w.std().item() - expected) < 0.25 * expected
