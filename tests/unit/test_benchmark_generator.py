"""The benchmark's fast training path (torch.compile of the teacher-forced forward) against the plain eager path, on
a tiny HAR generator in fp32 on CPU: logits and loss within 1e-4. The sampling fast path is the library's
(`restok.sampling.compile_sampling`), tested in test_sampling.py.

Run: .venv/bin/python -m pytest tests/unit/test_benchmark_generator.py -q
"""

import importlib.util
import json
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "bench_generator", Path(__file__).resolve().parents[2] / "benchmarks" / "generator.py"
)
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


def test_cli_rows_with_and_without_sampling(tmp_path, capsys):
    """The benchmark's own run on CPU (eager, tiny): training and sampling figures in its JSON; --sample-batch 0
    (the side-by-side's batch-256 part) measures training only."""
    tiny = [
        "--device",
        "cpu",
        "--size",
        "har-smoke",
        "--tokens",
        "8",
        "--vocab",
        "64",
        "--classes",
        "4",
        "--batch",
        "4",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--reps",
        "1",
        "--dtype",
        "fp32",
    ]
    bench.main([*tiny, "--sample-batch", "2", "--json", str(tmp_path / "a.json")])
    bench.main([*tiny, "--sample-batch", "0", "--json", str(tmp_path / "b.json")])
    with_sampling = json.loads((tmp_path / "a.json").read_text())["rows"]["eager"]
    training_only = json.loads((tmp_path / "b.json").read_text())["rows"]["eager"]
    assert with_sampling["seq_per_s"] > 0 and with_sampling["img_per_s"] > 0 and with_sampling["passes"] == 5
    assert with_sampling["cudagraph_skips"] == 0
    assert training_only["seq_per_s"] > 0 and "img_per_s" not in training_only
    out = capsys.readouterr().out
    assert "eager / official: train" in out and "sample" not in out.splitlines()[-1]
