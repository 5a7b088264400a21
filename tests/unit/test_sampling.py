"""Sampler: official CFG schedules and sampling step (cfg_sampling.npz), the KV-cache loop, seeding.

Run: .venv/bin/python -m pytest tests/unit/test_sampling.py -q
Schedules are compared in float64 exactly; the sampling step at the tolerances of tests/data/README.md §5. The
cached loop is checked against the teacher-forced forward on the codes it produced, which validates the mask
rows, RoPE positions, special-token indexing and cache bookkeeping together (docs/method.md, restok §5.2).
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from restok.models.generator import GeneratorConfig, HARGenerator
from restok.sampling import (
    SamplingConfig,
    allocate_kv_cache,
    combine_cfg,
    compile_sampling,
    draw_from_probs,
    filter_logits,
    generate,
    logits_to_probs,
    pass_rows,
    schedule_scales,
)

SCHEDULE_KWARGS = {"step": dict(window_start=0.25), "rectangular": dict(window_start=0.05)}  # official defaults
STEP_CASES = ["s_reported_", "s_early_", "s_topk_", "s_V1024_"]


def random_model(mode: str = "har", num_tokens: int = 16) -> HARGenerator:
    cfg = GeneratorConfig(
        dim=32,
        n_layer=2,
        n_head=2,
        vocab_size=32,
        num_tokens=num_tokens,
        num_classes=5,
        mode=mode,
        token_dropout=0.0,
        resid_dropout=0.0,
        ffn_dropout=0.0,
    )
    model = HARGenerator(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


@pytest.mark.parametrize(
    "name", ["step", "constant", "linear", "linear_re", "linear_constant", "triangular", "rectangular"]
)
def test_schedules_match_official_exactly(name, vectors):
    d = vectors("cfg_sampling")
    assert name in d["schedule_names"]
    sampling = SamplingConfig(cfg_scale=float(d["cfg_scale"][0]), cfg_schedule=name, **SCHEDULE_KWARGS.get(name, {}))
    passes = len(d["step_positions_start"])
    np.testing.assert_array_equal([k / (passes - 1) for k in range(passes)], d[f"{name}_ratio"])
    np.testing.assert_array_equal(schedule_scales(sampling, passes), d[f"{name}_scale"])


def test_cosine_schedules_are_implemented_and_sigmoid_refused(vectors):
    assert any(e.startswith("cosine: NameError") for e in vectors("cfg_sampling")["schedule_errors"])
    up = schedule_scales(SamplingConfig(cfg_scale=3.0, cfg_schedule="cosine"), 3)
    down = schedule_scales(SamplingConfig(cfg_scale=3.0, cfg_schedule="cosine_re"), 3)
    np.testing.assert_allclose(up, [1.0, 2.0, 3.0], atol=1e-12)
    np.testing.assert_allclose(down, [3.0, 2.0, 1.0], atol=1e-12)
    with pytest.raises(ValueError, match="sample.cfg_schedule"):
        SamplingConfig(cfg_schedule="sigmoid")


@pytest.mark.parametrize("case", STEP_CASES)
def test_sampling_step_matches_official(case, vectors):
    d = vectors("cfg_sampling")
    scale, temperature, top_k, top_p, seed = d[f"{case}params"]
    cond, uncond = torch.from_numpy(d[f"{case}cond_logits"]), torch.from_numpy(d[f"{case}uncond_logits"])
    combined = combine_cfg(cond, uncond, float(scale))
    np.testing.assert_allclose(combined.numpy(), d[f"{case}combined_logits"], atol=1e-5)
    probs = logits_to_probs(combined, float(temperature), int(top_k), float(top_p))  # (B, q, V)
    np.testing.assert_array_equal((probs > 0).numpy(), d[f"{case}kept"])
    np.testing.assert_allclose(probs.numpy(), d[f"{case}probs"], atol=1e-6)
    np.testing.assert_array_equal(probs.argmax(-1).numpy(), d[f"{case}greedy"])
    torch.manual_seed(int(seed))  # the official draw: global RNG, multinomial over (B*q, V)
    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:-1])
    np.testing.assert_array_equal(drawn.numpy(), d[f"{case}sampled_torch_seeded"])
    # our inverse-CDF draw never leaves the kept set
    ours = draw_from_probs(probs[:, :, None].expand(-1, -1, 500, -1), torch.rand(probs.shape[:-1] + (500,)))
    assert torch.gather(probs[:, :, None].expand(-1, -1, 500, -1), -1, ours[..., None]).min() > 0


def test_top_p_boundary_keeps_first_crossing_token():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))[None]  # cumulative 0.4, 0.7, 0.9, 1.0
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, True, False, False]  # 0.7 is the first to exceed 0.5: kept
    assert kept(0.75) == [True, True, True, False]
    assert kept(0.01) == [True, False, False, False]  # top-1 always kept
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2


def test_draw_from_probs_follows_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    u = torch.rand(40000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(draw_from_probs(probs.expand(len(u), -1), u), minlength=4).double() / len(u)
    assert counts[1] == 0
    np.testing.assert_allclose(counts.numpy(), probs.numpy(), atol=0.01)


@pytest.mark.parametrize("mode, passes", [("har", 6), ("ar", 16)])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_cached_logits_equal_teacher_forced(mode, passes, cfg_scale, monkeypatch):
    model = random_model(mode)
    calls = []
    real = model.forward_cached
    monkeypatch.setattr(model, "forward_cached", lambda *a: calls.append(len(a[2])) or real(*a))
    labels = torch.tensor([0, 4, 2])
    sampling = SamplingConfig(cfg_scale=cfg_scale, cfg_schedule="linear", top_p=0.9, top_k=20)
    codes, logits = generate(model, labels, sampling, seeds=[5, 6, 7], return_logits=True)
    assert codes.shape == (3, 16) and logits.shape == (3, 16, 32) and len(calls) == passes
    assert sum(calls) == 16
    with torch.no_grad():
        cond, _ = model(codes, labels)
        uncond, _ = model(codes, torch.full_like(labels, 5))
    sizes = model.cfg.block_sizes
    scales = torch.tensor(schedule_scales(sampling, passes)).repeat_interleave(torch.tensor(sizes))  # per position
    expected = combine_cfg(cond, uncond, scales[None, :, None].float()) if cfg_scale > 1 else cond
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_seeded_samples_do_not_depend_on_batch_split():
    model = random_model("har")
    sampling = SamplingConfig(cfg_scale=2.0, top_p=0.95)
    labels, seeds = torch.tensor([1, 2, 3, 4]), [10, 11, 12, 13]
    whole = generate(model, labels, sampling, seeds=seeds)
    parts = torch.cat(
        [generate(model, labels[:1], sampling, seeds=seeds[:1]), generate(model, labels[1:], sampling, seeds=seeds[1:])]
    )
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, generate(model, labels, sampling, seeds=[20, 21, 22, 23]))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(
        generate(model, labels, sampling, generator=gen()), generate(model, labels, sampling, generator=gen())
    )


def test_a_reused_kv_cache_gives_the_codes_of_a_fresh_one():
    """The sample stage keeps one cache per batch size (a compiled generator replays over its fixed addresses): a
    cache left by another batch, even holding non-finite values, must not change a single code or logit."""
    model = random_model("har")
    sampling = SamplingConfig(cfg_scale=2.0, top_p=0.95)
    labels = torch.tensor([1, 2, 3])
    kv = allocate_kv_cache(model, pass_rows(sampling, 3), torch.float32, torch.device("cpu"))
    generate(model, torch.tensor([4, 0, 1]), sampling, seeds=[1, 2, 3], kv=kv)  # leaves its keys/values behind
    assert all(t.abs().sum() > 0 for pair in kv for t in pair)
    kv[0][1][:, :, -1] = float("nan")  # a masked position: weight 0, but 0 x NaN = NaN
    fresh_codes, fresh_logits = generate(model, labels, sampling, seeds=[7, 8, 9], return_logits=True)
    codes, logits = generate(model, labels, sampling, seeds=[7, 8, 9], return_logits=True, kv=kv)
    assert torch.equal(codes, fresh_codes) and torch.equal(logits, fresh_logits)
    with pytest.raises(ValueError, match="holds 6 rows in 2 layers; this batch needs 4 rows"):
        generate(model, labels[:2], sampling, seeds=[7, 8], kv=kv)


def test_cpu_sampling_does_not_import_cuda_graph_machinery():
    """Regression: generate() began every call with cudagraph_mark_step_begin, whose first call imports inductor's
    cudagraph_trees (about 1 s here), inside the sample stage's timed first batch: generation 486 -> 146 images/s in
    the default run. On CPU there are no CUDA graphs to mark."""
    code = (
        "import sys, torch\n"
        "from restok.models.generator import GeneratorConfig, HARGenerator\n"
        "from restok.sampling import SamplingConfig, generate\n"
        "cfg = GeneratorConfig(dim=32, n_layer=1, n_head=2, vocab_size=32, num_tokens=8, num_classes=5)\n"
        "generate(HARGenerator(cfg).eval(), torch.tensor([0, 1]), SamplingConfig(cfg_scale=2.0), seeds=[0, 1])\n"
        "print('torch._inductor.cudagraph_trees' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_compiled_sampling_matches_eager_fp32():
    """`sample.compile`: forward_cached compiled per block size (CPU: inductor's default mode; CUDA graphs only on a
    GPU), over a reused static cache: logits within 1e-4 of the eager loop and the same codes, in fp32."""
    eager, fast = random_model("har"), random_model("har")
    fast.load_state_dict(eager.state_dict())
    compile_sampling(fast)
    sampling = SamplingConfig(cfg_scale=3.75, top_p=0.95)
    labels, seeds = torch.tensor([0, 1, 3]), [11, 12, 13]
    ref_codes, ref_logits = generate(eager, labels, sampling, seeds=seeds, return_logits=True)
    kv = allocate_kv_cache(fast, pass_rows(sampling, 3), torch.float32, torch.device("cpu"))
    for _ in range(2):  # the second call replays the graphs compiled by the first over the same cache
        codes, logits = generate(fast, labels, sampling, seeds=seeds, return_logits=True, kv=kv)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
        assert torch.equal(codes, ref_codes)


def test_generate_refusals():
    model = random_model("har")
    with pytest.raises(ValueError, match="eval"):
        generate(model.train(), torch.tensor([0]), SamplingConfig())
    no_null = HARGenerator(
        GeneratorConfig(
            dim=32, n_layer=1, n_head=2, vocab_size=32, num_tokens=16, num_classes=5, class_dropout_prob=0.0
        )
    ).eval()
    with pytest.raises(ValueError, match="null class"):
        generate(no_null, torch.tensor([0]), SamplingConfig(cfg_scale=2.0))


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=0.0),
        dict(top_p=0.0),
        dict(top_k=-1),
        dict(peak=1.0),
        dict(cfg_scale=-1.0),
        dict(window_start=0.5, window_end=0.4),
    ],
)
def test_sampling_config_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="sample"):
        SamplingConfig(**bad)


def test_reported_setting_per_step():
    """docs/method.md, restok fact 10: s = 1.0001 at k = 0, 1 and 3.75 from k = 2 (ratio 0.25) on, over 9 passes."""
    scales = schedule_scales(SamplingConfig(), 9)
    assert scales[:2] == [1.0001, 1.0001] and scales[2:] == [3.75] * 7
    assert math.isclose(SamplingConfig().top_p, 0.95)
