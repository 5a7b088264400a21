"""The benchmark's fast paths (torch.compile of training forward and of the cached inference pass) against the plain
eager path, on a tiny HAR generator in fp32 on CPU: logits within 1e-4.

Run: .venv/bin/python -m pytest tests/unit/test_benchmark_generator.py -q
"""
import importlib.util
from pathlib import Path

import torch

from restok.sampling import SamplingConfig, generate

_spec = importlib.util.spec_from_file_location("bench_generator",
                                               Path(__file__).resolve().parents[2] / "benchmarks" / "generator.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_compiled_paths_match_eager_fp32():
    eager = bench.build("har-smoke", tokens=8, vocab=64, classes=4, device=torch.device("cpu")).eval()
    fast = bench.build("har-smoke", tokens=8, vocab=64, classes=4, device=torch.device("cpu")).eval()
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), fast.state_dict().values()))
    codes = torch.randint(0, 64, (3, 8))
    labels = torch.tensor([0, 1, 3])
    with torch.no_grad():
        ref, ref_loss = eager(codes, labels)
        got, got_loss = bench.compile_for_training(fast)(codes, labels)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-4, rtol=0)

    sampling = SamplingConfig(cfg_scale=3.75, top_p=0.95)
    bench.compile_for_sampling(fast)
    seeds = [11, 12, 13]
    ref_codes, ref_logits = generate(eager, labels, sampling, seeds=seeds, return_logits=True)
    got_codes, got_logits = generate(fast, labels, sampling, seeds=seeds, return_logits=True)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.equal(got_codes, ref_codes)
