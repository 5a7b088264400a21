"""The benchmark's fast training path (torch.compile of the teacher-forced forward) against the plain eager path, on
a tiny HAR generator in fp32 on CPU: logits and loss within 1e-4. The sampling fast path is the library's
(`restok.sampling.compile_sampling`), tested in test_sampling.py.

Run: .venv/bin/python -m pytest tests/unit/test_benchmark_generator.py -q
"""
import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("bench_generator",
                                               Path(__file__).resolve().parents[2] / "benchmarks" / "generator.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_compiled_training_forward_matches_eager_fp32():
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

