"""HAR generator: official layout and whole-model vectors, causality, key mapping, sizes.

Run: .venv/bin/python -m pytest tests/unit/test_generator.py -q
The vectors come from the official code (tests/data/README.md §4 and §6); the structural tests (causality,
cached = teacher-forced, AR mode) need no oracle. Everything runs on CPU in fp32 with tiny models.
"""

import math

import numpy as np
import pytest
import torch

from restok.convert.official import GENERATOR_KEYS, export_official_generator_state, load_official_generator_state
from restok.models.generator import (
    GENERATOR_PRESETS,
    GeneratorConfig,
    HARGenerator,
    LabelEmbedder,
    generator_config,
    input_layout,
)
from restok.models.masks import group_ids
from restok.sampling import SamplingConfig, generate

NO_DROPOUT = dict(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
GREEDY = dict(greedy=True, top_p=1.0)


def official_tiny(vectors) -> tuple[HARGenerator, dict]:
    """The model of docs/method.md, restok §5.2, with the official weights from har_tiny_gpt.npz."""
    d = vectors("har_tiny_gpt")
    cfg = generator_config("har-smoke", vocab_size=64, num_tokens=16, spe_token_num=15, num_classes=10, **NO_DROPOUT)
    model = HARGenerator(cfg).eval()
    load_official_generator_state(model, {k[3:]: torch.from_numpy(d[k]) for k in d.files if k.startswith("sd.")})
    return model, d


def random_model(mode: str = "har", num_tokens: int = 16, **kw) -> HARGenerator:
    """Tiny random model with a non-zero head (the default zero head makes every logit 0)."""
    cfg = GeneratorConfig(
        dim=32,
        n_layer=2,
        n_head=2,
        vocab_size=32,
        num_tokens=num_tokens,
        num_classes=5,
        mode=mode,
        **{**NO_DROPOUT, **kw},
    )
    model = HARGenerator(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def marker_model(prefix: str, vectors) -> tuple[HARGenerator, dict]:
    """Model built like the har_layout.npz one, with marker rows: channel 0 = kind (1 token, 2 special, 3 class),
    channel 1 = index."""
    d = vectors("har_layout")
    T = int(d[f"{prefix}train_len"][0])
    cfg = GeneratorConfig(
        dim=16,
        n_layer=1,
        n_head=2,
        vocab_size=T,
        num_tokens=T,
        num_classes=10,
        spe_token_num=int(d[f"{prefix}spe_token_num"][0]),
        **NO_DROPOUT,
    )
    model = HARGenerator(cfg).eval()
    with torch.no_grad():
        for table, kind in ((model.tok_emb.weight, 1), (model.special_emb.weight, 2), (model.cls_emb.table.weight, 3)):
            table.zero_()
            table[:, 0] = kind
            table[:, 1] = torch.arange(len(table))
    return model, d


def decode_markers(x: torch.Tensor, kind: int) -> np.ndarray:
    """Index held per position for one marker kind, -1 elsewhere; x (n, D)."""
    return torch.where(x[:, 0] == kind, x[:, 1], -1).long().numpy()


@pytest.mark.parametrize("prefix", ["h16_", "h128_"])
def test_training_layout_mask_rope_targets(prefix, vectors):
    model, d = marker_model(prefix, vectors)
    cfg, T = model.cfg, model.cfg.num_tokens
    assert cfg.block_sizes[:4] == [1, 1, 1, 1] and len(d[f"{prefix}levels"]) == round(math.log2(T)) + 1
    x = model.embed(torch.arange(T)[None], torch.tensor([7]), model.positions)[0]  # (T, D)
    np.testing.assert_array_equal(decode_markers(x, 1), d[f"{prefix}train_token"])
    np.testing.assert_array_equal(decode_markers(x, 2), d[f"{prefix}train_special"])
    np.testing.assert_array_equal(decode_markers(x, 3) >= 0, d[f"{prefix}train_is_class"])
    np.testing.assert_array_equal(model.attn_mask.numpy(), d[f"{prefix}train_allowed"])
    np.testing.assert_array_equal(group_ids(cfg.block_sizes).numpy(), d[f"{prefix}block_id"])
    # RoPE row p rotates by (rope position) * base^(-2i/hd)
    freqs = 10000.0 ** (-np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    angles = d[f"{prefix}train_rope_pos"].astype(np.float64)[:, None] * freqs
    np.testing.assert_allclose(model.rope_cos.numpy(), np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(model.rope_sin.numpy(), np.sin(angles), atol=1e-6)
    # the loss pairs logit position p with code train_target[p]
    torch.nn.init.normal_(model.head.weight)
    codes = torch.randint(0, T, (2, T))
    logits, loss = model(codes, torch.tensor([1, 2]))
    target = codes[:, torch.from_numpy(d[f"{prefix}train_target"]).long()]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()))


@pytest.mark.parametrize("prefix", ["h16_", "h128_"])
def test_inference_passes_inputs_and_mask_rows(prefix, vectors, monkeypatch):
    """Stub logits make pass k sample t_p = p, as the official recording did; record each pass's inputs."""
    model, d = marker_model(prefix, vectors)
    T, V = model.cfg.num_tokens, model.cfg.vocab_size
    passes, inputs = [], torch.zeros(T, model.cfg.dim)
    real_embed, real_cached = model.embed, model.forward_cached

    def embed(codes, labels, pos):
        x = real_embed(codes, labels, pos)
        inputs[pos] = x[0]
        return x

    def forward_cached(codes, labels, pos, kv):
        passes.append(pos.clone())
        real_cached(codes, labels, pos, kv)
        return 10.0 * torch.nn.functional.one_hot(pos, V).float().expand(len(labels), -1, -1)

    monkeypatch.setattr(model, "embed", embed)
    monkeypatch.setattr(model, "forward_cached", forward_cached)
    codes = generate(model, torch.tensor([4]), SamplingConfig(cfg_scale=1.0, **GREEDY))

    assert len(passes) == d[f"{prefix}infer_num_passes"][0]
    np.testing.assert_array_equal([int(p[0]) for p in passes], d[f"{prefix}infer_pass_start"])
    np.testing.assert_array_equal([len(p) for p in passes], d[f"{prefix}infer_pass_len"])
    for p, first, count in zip(passes, d[f"{prefix}infer_pass_new_first"], d[f"{prefix}infer_pass_new_count"]):
        np.testing.assert_array_equal(p.numpy(), np.arange(first, first + count))  # pass samples its positions
    np.testing.assert_array_equal(codes[0].numpy(), np.arange(T))
    np.testing.assert_array_equal(decode_markers(inputs, 1), d[f"{prefix}infer_token"])
    np.testing.assert_array_equal(decode_markers(inputs, 2), d[f"{prefix}infer_special"])
    np.testing.assert_array_equal(decode_markers(inputs, 3) >= 0, d[f"{prefix}infer_is_class"])
    assert model.cfg.cache_len == d[f"{prefix}infer_cache_len"][0]
    np.testing.assert_array_equal(model.cache_mask.numpy(), d[f"{prefix}infer_allowed"])
    keys = [int(model.cache_mask[p].sum(-1).unique().item()) for p in passes]  # equal within a pass
    np.testing.assert_array_equal(keys, d[f"{prefix}infer_pass_allowed_keys"])


def test_official_tiny_teacher_forced_logits_and_loss(vectors):
    model, d = official_tiny(vectors)
    codes, labels = torch.from_numpy(d["codes"]).long(), torch.from_numpy(d["labels"]).long()
    with torch.no_grad():
        logits, loss = model(codes, labels)
        null_logits, _ = model(codes, torch.full_like(labels, 10))
    np.testing.assert_allclose(logits.numpy(), d["logits"], atol=1e-5)
    np.testing.assert_allclose(null_logits.numpy(), d["logits_null_label"], atol=1e-5)
    np.testing.assert_allclose(loss.item(), d["ar_loss"][0], atol=1e-5)


@pytest.mark.parametrize(
    "case, sampling",
    [("nocfg", dict(cfg_scale=1.0)), ("cfg", dict(cfg_scale=3.75, cfg_schedule="step", window_start=0.25))],
)
def test_official_tiny_greedy_generation(case, sampling, vectors):
    model, d = official_tiny(vectors)
    labels = torch.from_numpy(d["labels"]).long()
    codes, logits = generate(model, labels, SamplingConfig(**sampling, **GREEDY), return_logits=True)
    np.testing.assert_array_equal(codes.numpy(), d[f"gen_{case}_codes"])
    np.testing.assert_allclose(logits.numpy(), d[f"gen_{case}_logits"], atol=1e-5)


@pytest.mark.parametrize("mode", ["har", "ar"])
def test_causality_changing_a_code_leaves_earlier_blocks_unchanged(mode):
    """t_j is an input only at positions of the block after the one that predicts it (position j), so every
    logit of the blocks up to block(j) ignores it and the next block sees it; the last block's codes are inputs
    nowhere (HAR truncates the sequence at T positions)."""
    model = random_model(mode)
    cfg, T = model.cfg, model.cfg.num_tokens
    block = group_ids(cfg.block_sizes)  # (T,)
    token_at = torch.tensor(input_layout(cfg)[1])  # (T,) code index held at each position, -1 none
    codes, labels = torch.randint(0, cfg.vocab_size, (2, T)), torch.tensor([1, 3])
    with torch.no_grad():
        base, _ = model(codes, labels)
        for j in range(T):
            changed = codes.clone()
            changed[:, j] = (codes[:, j] + 1) % cfg.vocab_size
            logits, _ = model(changed, labels)
            readers = (token_at == j).nonzero().flatten()
            if len(readers) == 0:  # codes of the last block are never inputs
                assert block[j] == block[-1]
                torch.testing.assert_close(logits, base, rtol=0, atol=0)
                continue
            first = int(block[readers].min())
            assert first == block[j] + 1
            keep = block < first
            torch.testing.assert_close(logits[:, keep], base[:, keep], rtol=0, atol=1e-6)
            assert (logits[:, block == first] - base[:, block == first]).abs().max() > 1e-4


def test_special_rows_beyond_the_used_ones_get_no_gradient():
    """Only S_0..S_{T/2-2} appear in the input (docs/method.md, restok §4 #7); the other rows stay for checkpoint shape."""
    model = random_model("har").train()
    _, loss = model(torch.randint(0, 32, (3, 16)), torch.tensor([0, 1, 2]))
    loss.backward()
    used = model.special_emb.weight.grad.abs().sum(-1) > 0
    assert model.special_emb.weight.shape[0] == 15
    np.testing.assert_array_equal(used.numpy(), np.arange(15) < 7)


def test_ar_mode_shapes_and_no_special_table():
    model = random_model("ar")
    assert model.special_emb is None and model.cfg.block_sizes == [1] * 16
    logits, loss = model(torch.randint(0, 32, (3, 16)), torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 16, 32) and loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(model.attn_mask, torch.ones(16, 16, dtype=torch.bool).tril())


def test_label_dropout_only_in_training():
    emb = LabelEmbedder(num_classes=4, dim=8, dropout_prob=0.3)
    labels = torch.zeros(20000, dtype=torch.long)
    null_row = emb.table.weight[4]
    assert not (emb.eval()(labels) == null_row).all(-1).any()
    rate = (emb.train()(labels) == null_row).all(-1).float().mean().item()
    assert abs(rate - 0.3) < 0.02


def test_official_key_mapping_round_trip_and_refusals(vectors):
    model, d = official_tiny(vectors)
    official = {k[3:]: torch.from_numpy(d[k]) for k in d.files if k.startswith("sd.")}
    exported = export_official_generator_state(model)
    assert exported.keys() == official.keys()
    for key, value in official.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0)

    fresh = HARGenerator(model.cfg)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    bad = dict(official)
    bad.pop("norm.weight")
    bad["layers.9.attention.wo.weight"] = torch.zeros(64, 64)
    bad["output.weight"] = torch.zeros(65, 64)
    with pytest.raises(ValueError) as err:
        load_official_generator_state(fresh, bad)
    for needle in ("norm.weight", "layers.9.attention.wo.weight", "head.weight: official (65, 64) vs ours (64, 64)"):
        assert needle in str(err.value)
    for key, value in fresh.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key])
    assert len(GENERATOR_KEYS) == len({ours for ours, _ in GENERATOR_KEYS})


def test_har_l_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = HARGenerator(generator_config("har-L"))
    assert model.cfg.ffn_hidden_dim == 2816 and model.cls_emb.table.num_embeddings == 1001
    assert model.special_emb.num_embeddings == 127 and model.cfg.block_sizes == [1, 1, 1, 1, 4, 8, 16, 32, 64]
    assert sum(p.numel() for p in model.parameters()) == 326_263_808  # 326.264M (docs/method.md, restok §5.3)


@pytest.mark.parametrize("name", list(GENERATOR_PRESETS))
def test_presets_build(name):
    cfg = generator_config(name)
    assert cfg.dim % cfg.n_head == 0 and cfg.head_dim % 2 == 0


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(dim=30, n_head=4), "dim"),
        (dict(mode="nar"), "mode"),
        (dict(num_tokens=24), "num_tokens"),
        (dict(ar_token_num=3), "ar_token_num"),
        (dict(spe_token_num=62), "spe_token_num"),
        (dict(mode="ar", spe_token_num=127), "spe_token_num"),
        (dict(token_dropout=1.0), "token_dropout"),
    ],
)
def test_config_refuses_bad_values(bad, field):
    with pytest.raises(ValueError, match=f"generator.{field}"):
        GeneratorConfig(**bad)
