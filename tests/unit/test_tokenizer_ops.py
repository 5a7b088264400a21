"""Tokenizer structure and operators against the official test vectors (tests/data/README.md §1–2).

Run: .venv/bin/python -m pytest tests/unit/test_tokenizer_ops.py -q
The L-config vectors go through the model-free functions of restok.models.vit / rope / tokenizer only (the L
model is never built). The tiny-parity structure (8x8 grid, 32 tokens, 6 blocks, 4 stages) is also checked on a
narrow encoder/decoder built from our modules, by recording what every block really receives.
"""

import numpy as np
import pytest
import torch

from restok.models.masks import group_causal_mask, group_ids
from restok.models.rope import apply_rope, decoder_rope_ids, encoder_rope_ids, rope_table
from restok.models.tokenizer_config import TokenizerConfig, keep_lengths, keep_probs, merge_block_indices, pool_grid
from restok.models.vit import (
    LegacyReshape,
    PerLevelLinear,
    ResTokDecoder,
    ResTokEncoder,
    block_stages,
    encoder_group_sizes,
    latent_maps,
    legacy_head_index_map,
    merge_tokens,
    residual_pool_init,
    stage_image_grids,
)

PREFIXES = ("tiny_", "L_")


def _structure(s, p):
    """Sizes of configuration p as stored in tok_structure.npz."""
    levels = [int(n) for n in s[f"{p}levels"]]
    grid = tuple(int(g) for g in s[f"{p}grid"])
    return levels, grid, int(s[f"{p}num_layers"][0]), int(s[f"{p}num_stages"][0])


def _narrow_tiny_parity_cfg():
    """The tiny-parity structure (128 px, 16x CNN, 8x8 grid, 6 blocks, 4 stages, 32 tokens) at width 64."""
    return TokenizerConfig(
        resolution=128,
        pixel_channels=(32,) * 5,
        pixel_z_channels=32,
        enc_width=64,
        enc_depth=6,
        enc_heads=1,
        dec_width=64,
        dec_depth=6,
        dec_heads=1,
        level_sizes=(1, 1, 2, 4, 8, 16),
        codebook_size=64,
        vf_align=False,
    )


@pytest.mark.parametrize("p", PREFIXES)
def test_levels_grids_merges_keep(vectors, p):
    s = vectors("tok_structure")
    levels, grid, depth, stages = _structure(s, p)
    cfg = TokenizerConfig(
        resolution=grid[0] * 16, level_sizes=tuple(levels), enc_depth=depth, hierarchy_stages=stages, vf_align=False
    )
    assert list(cfg.level_sizes) == s[f"{p}dec_levels"].tolist()
    assert [list(pool_grid(n)) for n in levels] == s[f"{p}pool_grid"].tolist()
    assert [list(g) for g in cfg.pool_grids] == s[f"{p}pool_grid"].tolist()
    assert list(merge_block_indices(depth, stages)) == s[f"{p}merge_blocks"].tolist()
    assert list(cfg.merge_blocks) == s[f"{p}merge_blocks"].tolist()
    assert keep_lengths(tuple(levels), 4) == s[f"{p}keep_lengths"].tolist()
    probs = np.array(keep_probs(len(cfg.keep_lengths), 0.2), dtype=np.float64)
    assert np.array_equal(probs, s[f"{p}keep_probs"])  # exact, float64
    assert cfg.num_tokens + grid[0] * grid[1] == int(s[f"{p}dec_seq_len"][0])


@pytest.mark.parametrize("p", PREFIXES)
def test_stage_groups_masks_rope_ids(vectors, p):
    s = vectors("tok_structure")
    levels, grid, depth, stages = _structure(s, p)
    for stage, grids in enumerate(stage_image_grids(grid, stages)):
        sizes = encoder_group_sizes(grids, levels)
        assert sizes == s[f"{p}s{stage}_group_sizes"].tolist()
        assert len(grids) == int(s[f"{p}s{stage}_num_image_groups"][0])
        assert np.array_equal(group_ids(sizes).numpy(), s[f"{p}s{stage}_group_id"])
        assert np.array_equal(group_causal_mask(sizes).numpy(), s[f"{p}s{stage}_allowed"])
        ids = encoder_rope_ids(grids, sum(levels)).numpy()
        assert np.array_equal(ids[:, 0], s[f"{p}s{stage}_rope_row"])
        assert np.array_equal(ids[:, 1], s[f"{p}s{stage}_rope_col"])
    ids = decoder_rope_ids(sum(levels), grid).numpy()
    assert np.array_equal(ids[:, 0], s[f"{p}dec_rope_row"])
    assert np.array_equal(ids[:, 1], s[f"{p}dec_rope_col"])
    assert s[f"{p}rope_axes_dim"].tolist() == [32, 32] and float(s[f"{p}rope_theta"][0]) == 10000.0


@pytest.mark.parametrize("p", PREFIXES)
def test_block_stage_and_seq_len(vectors, p):
    s = vectors("tok_structure")
    levels, grid, depth, stages = _structure(s, p)
    per_block = block_stages(depth, merge_block_indices(depth, stages))
    assert per_block == s[f"{p}block_stage"].tolist()
    grids = stage_image_grids(grid, stages)
    assert [sum(encoder_group_sizes(grids[b], levels)) for b in per_block] == s[f"{p}block_seq_len"].tolist()
    assert [grids[b][0][0] * grids[b][0][1] for b in per_block] == s[f"{p}block_num_image_tokens"].tolist()


def test_tiny_encoder_blocks_receive_the_stored_masks_and_rope(vectors):
    """Record mask, RoPE table and sequence length at every attention of our encoder and decoder."""
    s = vectors("tok_structure")
    cfg = _narrow_tiny_parity_cfg()
    seen = []

    def record(module, args, kwargs):
        x, cos, sin = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("mask")
        seen.append((x.shape[1], cos, mask))

    for part, feat_or_codes in ((ResTokEncoder(cfg), torch.randn(1, 32, 8, 8)), (ResTokDecoder(cfg), None)):
        for block in part.blocks:
            block.attn.register_forward_pre_hook(record, with_kwargs=True)
        if feat_or_codes is None:
            part(torch.randn(1, 32, 8), torch.tensor([32]))
        else:
            part(feat_or_codes)
    enc, dec = seen[:6], seen[6:]
    for i, (length, cos, mask) in enumerate(enc):
        stage = int(s["tiny_block_stage"][i])
        assert length == int(s["tiny_block_seq_len"][i])
        assert np.array_equal(mask.numpy(), s[f"tiny_s{stage}_allowed"])
        ids = torch.from_numpy(np.stack([s[f"tiny_s{stage}_rope_row"], s[f"tiny_s{stage}_rope_col"]], 1))
        assert torch.equal(cos, rope_table(ids.long(), 64)[0])
    dec_ids = torch.from_numpy(np.stack([s["tiny_dec_rope_row"], s["tiny_dec_rope_col"]], 1)).long()
    for (length, cos, mask), has_mask in zip(dec, s["tiny_dec_block_has_mask"]):
        assert length == int(s["tiny_dec_seq_len"][0])
        assert (mask is not None) == bool(has_mask)
        assert torch.equal(cos, rope_table(dec_ids, 64)[0])


@pytest.mark.parametrize("which", ["enc_last", "dec"])
def test_rope_application(vectors, which):
    s, ops = vectors("tok_structure"), vectors("tok_ops")
    if which == "enc_last":
        ids = encoder_rope_ids(stage_image_grids((8, 8), 4)[-1], 32)
    else:
        ids = decoder_rope_ids(32, (8, 8))
    q = torch.from_numpy(ops[f"rope_tiny_{which}_q"])
    out = apply_rope(q, *rope_table(ids, 64, float(s["tiny_rope_theta"][0])))
    np.testing.assert_allclose(out.numpy(), ops[f"rope_tiny_{which}_out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("p", PREFIXES)
def test_legacy_head_index_map(vectors, p):
    s = vectors("tok_structure")
    width, num_tokens = s[f"{p}legacy_src_token"].shape
    token, channel = legacy_head_index_map(num_tokens, width)
    assert np.array_equal(token.numpy(), s[f"{p}legacy_src_token"])
    assert np.array_equal(channel.numpy(), s[f"{p}legacy_src_channel"])
    # The module feeds code position j with exactly the mapped scalars of Y (index-coded probe).
    y = torch.arange(num_tokens * width, dtype=torch.float64).view(1, num_tokens, width)
    t = LegacyReshape()(y)[0]  # (L, D): row j = channels fed to code j
    assert torch.equal(t.T, y[0, token, channel])


@pytest.mark.parametrize("p", PREFIXES)
def test_code_level_of_per_level_projection(vectors, p):
    s = vectors("tok_structure")
    levels = [int(n) for n in s[f"{p}levels"]]
    proj = PerLevelLinear(levels, 4, 1)
    with torch.no_grad():
        for level, lin in enumerate(proj.linears):
            lin.weight.zero_()
            lin.bias.fill_(level)
    assert proj(torch.zeros(1, sum(levels), 4))[0, :, 0].long().tolist() == s[f"{p}code_level"].tolist()


def test_legacy_head_on_stored_weights(vectors):
    ops = vectors("tok_ops")
    proj = PerLevelLinear([1, 1, 2, 4, 8, 16], 512, 8)
    with torch.no_grad():
        for level, lin in enumerate(proj.linears):
            lin.weight.copy_(torch.from_numpy(ops["head_W"][level]))
            lin.bias.copy_(torch.from_numpy(ops["head_b"][level]))
        y = torch.from_numpy(ops["head_Y"])
        z = proj(LegacyReshape()(y))  # (1, 32, 8)
        want = torch.from_numpy(ops["head_z"][:, :, 0, :]).transpose(1, 2)
        torch.testing.assert_close(z, want, atol=1e-5, rtol=0)
        assert (proj(y) - want).abs().max() > 0.1  # the transposed head is really different


@pytest.mark.parametrize("p", PREFIXES)
def test_residual_and_plain_latent_init(vectors, p):
    ops = vectors("tok_ops")
    feat = torch.from_numpy(ops[f"{p}init_F"])
    grids = [tuple(int(v) for v in g) for g in ops[f"{p}init_pool_grid"]]
    atol = 1e-6 * feat.abs().max().item()
    for residual, key in ((True, "init_Z_residual"), (False, "init_Z_plain")):
        z = residual_pool_init(feat, grids, residual=residual)
        np.testing.assert_allclose(z.numpy(), ops[f"{p}{key}"], atol=atol, rtol=0)


@pytest.mark.parametrize("p", PREFIXES)
def test_decoder_latent_maps(vectors, p):
    ops = vectors("tok_ops")
    tokens = torch.from_numpy(ops[f"{p}maps_tokens"])
    grids = [tuple(int(v) for v in g) for g in ops[f"{p}init_pool_grid"]]
    size = tuple(ops[f"{p}maps_sum"].shape[-2:])
    for residual, key in ((True, "maps_sum"), (False, "maps_mean")):
        np.testing.assert_allclose(
            latent_maps(tokens, grids, size, residual).numpy(), ops[f"{p}{key}"], atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("p", PREFIXES)
def test_residual_merge_chain_bit_exact(vectors, p):
    ops = vectors("tok_ops")
    x = torch.from_numpy(ops[f"{p}merge_seq0"])
    for k, n in enumerate(ops[f"{p}merge_n"].tolist()):
        x = merge_tokens(x, n, "subsample", residual=True)
        assert torch.equal(x, torch.from_numpy(ops[f"{p}merge_seq{k + 1}"]))
        assert torch.all(x[:, n // 2 : n // 2 + n : 2] == 0)  # even residual tokens are exactly 0
    num_image = x.shape[1] - int(ops[f"{p}merge_num_latent"][0])
    assert num_image == 2 * int(ops[f"{p}merge_n"][0]) - int(ops[f"{p}merge_n"][-1]) // 2


def test_merge_without_residual(vectors):
    ops = vectors("tok_ops")
    out = merge_tokens(torch.from_numpy(ops["tiny_merge_seq0"]), 64, "subsample", residual=False)
    assert torch.equal(out, torch.from_numpy(ops["tiny_merge_noresidual_out"]))


def test_avgpool_merge_is_the_pairwise_mean():
    x = torch.randn(2, 24, 5)
    out = merge_tokens(x, 16, "avgpool", residual=True)
    torch.testing.assert_close(out[:, :8], (x[:, 0:16:2] + x[:, 1:16:2]) / 2)
    torch.testing.assert_close(out[:, 8:24:2] + out[:, 9:24:2], torch.zeros(2, 8, 5), atol=1e-6, rtol=0)
    assert torch.equal(out[:, 24:], x[:, 16:])
