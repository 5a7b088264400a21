"""benchmarks/side_by_side.py on a machine without CUDA: it stops with a message before running anything, and its
report turns the parts' JSON files (the layouts our benchmarks and bench_official.py write) into ours / official.

Run: .venv/bin/python -m pytest tests/unit/test_side_by_side.py -q
"""

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "side_by_side", Path(__file__).resolve().parents[2] / "benchmarks" / "side_by_side.py"
)
sbs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sbs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without CUDA")
def test_without_cuda_it_stops_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        sbs.main(["--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_report_gives_ours_over_official_per_figure():
    tok_row = {
        "batch": 16,
        "compile": True,
        "checkpointing": "none",
        "train_images_per_s": 114.0,
        "encode_images_per_s": 316.0,
        "decode_images_per_s": 468.0,
    }
    results = {
        "tokenizer": {"device": "GPU", "rows": [tok_row]},
        "tokenizer_ckpt": {
            "device": "GPU",
            "rows": [{"batch": 32, "compile": False, "checkpointing": "all", "oom": True}],
        },
        "generator": {
            "device": "GPU",
            "dtype": "bf16",
            "batch": 32,
            "sample_batch": 50,
            "rows": {
                "compiled": {
                    "seq_per_s": 1144.0,
                    "img_per_s": 885.0,
                    "attention_kernels": ["aten::_scaled_dot_product_efficient_attention"],
                    "sample_attention_kernels": ["aten::_scaled_dot_product_attention_math"],
                }
            },
        },
        "generator_b256": {
            "device": "GPU",
            "dtype": "bf16",
            "batch": 256,
            "sample_batch": 0,
            "rows": {"eager": {"oom": True}, "compiled": {"seq_per_s": 1430.0}},
        },
        "official": {
            "env": {"gpu": "GPU"},
            "summary": {
                "tok_train_images_per_s": 38.0,
                "tok_encode_images_per_s": 158.0,
                "tok_decode_images_per_s": 234.0,
                "gpt_train_sequences_per_s": 286.0,
                "har_sample_bf16_images_per_s": 177.0,
            },
        },
    }
    rows = {(figure, label): (ours, ref) for figure, label, ours, ref in sbs.table(results)}
    assert rows[("tokenizer train img/s", "batch 16, compiled, checkpointing none")] == (114.0, 38.0)
    assert rows[("tokenizer train img/s", "batch 32, eager, checkpointing all")] == (None, 38.0)
    assert rows[("generator train seq/s", "batch 32, compiled, bf16")] == (1144.0, 286.0)
    assert rows[("generator train seq/s", "batch 256, eager, bf16")] == (None, 286.0)
    assert rows[("generator train seq/s", "batch 256, compiled, bf16")] == (1430.0, 286.0)
    assert rows[("sampling img/s", "batch 50, compiled, bf16")] == (885.0, 177.0)
    assert sum(figure == "sampling img/s" for figure, _ in rows) == 1  # the batch-256 part samples nothing
    lines = sbs.report(results).splitlines()
    for figure, ratio, target in (
        ("tokenizer train", "x3.00", "x3"),
        ("generator train", "x4.00", "x4"),
        ("sampling", "x5.00", "x5"),
    ):
        cells = next(line for line in lines if line.startswith(figure) and ratio in line).split()
        assert cells[cells.index(ratio) + 1] == target
    assert "attention fused    generator compiled train aten::_scaled_dot_product_efficient_attention" in lines
    assert "attention UNFUSED  generator compiled sample aten::_scaled_dot_product_attention_math" in lines
    assert lines[-1].startswith("devices: GPU")
