"""restok.models.attention: fp32 SDPA on CPU under bf16 autocast (the CPU flash kernel's bf16 path is the slow one,
`benchmarks/cpu_attention.py`), the plain fused call everywhere else; both models route their attention through it.

Run: .venv/bin/python -m pytest tests/unit/test_attention.py -q
"""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from restok.models import attention as attention_module
from restok.models.attention import attention, sdpa_kernels
from restok.models.generator import HARGenerator, generator_config
from restok.models.masks import group_causal_mask
from restok.models.tokenizer import PRESETS, ResTok

ROOT = Path(__file__).resolve().parents[2]


def _qkv(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, 12, 8, generator=g).to(dtype) for _ in range(3))
    mask = torch.ones(12, 12, dtype=torch.bool).tril()
    return q, k, v, mask


def test_fp32_inputs_without_autocast_are_the_plain_call():
    q, k, v, mask = _qkv()
    assert torch.equal(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_bf16_autocast_on_cpu_computes_in_fp32_and_returns_bf16_with_gradients():
    q, k, v, mask = _qkv()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(*leaves, mask)
    assert out.dtype == torch.bfloat16  # what the autocast caller expects, as from F.scaled_dot_product_attention
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # the same fp32 inputs, fp32 throughout
    assert torch.equal(out, ref.to(torch.bfloat16))
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)


def test_bf16_inputs_on_cpu_are_computed_in_fp32():
    q, k, v, mask = _qkv(torch.bfloat16)
    out = attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def _record_sdpa_dtypes(monkeypatch) -> list:
    seen, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        seen.append(q.dtype)
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", recording)
    return seen


def test_the_tokenizer_attends_in_fp32_under_cpu_bf16_autocast(monkeypatch):
    seen = _record_sdpa_dtypes(monkeypatch)
    torch.manual_seed(0)
    model = ResTok(PRESETS["restok-tiny/32"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(2, 3, 64, 64))
    assert seen and set(seen) == {torch.float32}  # every encoder and decoder block went through the helper


def test_the_generator_attends_in_fp32_under_cpu_bf16_autocast(monkeypatch):
    seen = _record_sdpa_dtypes(monkeypatch)
    torch.manual_seed(0)
    model = HARGenerator(generator_config("har-smoke", vocab_size=80, num_tokens=16, num_classes=10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(80, (2, 16)), torch.randint(10, (2,)), with_logits=False)
    assert len(seen) == model.cfg.n_layer and set(seen) == {torch.float32}


def test_the_benchmark_runs_both_models_and_prints_ratios(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_cpu_attention", ROOT / "benchmarks" / "cpu_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(
        ["--params", str(ROOT / "params.yaml"), "--threads", "1", "--steps", "1", "--warmup", "0", "--rounds", "1"]
    )
    out = capsys.readouterr().out
    assert "tokenizer: fp32 attention" in out and "generator: fp32 attention" in out
    assert bench.vit_module.attention is attention and bench.generator_module.attention is attention  # restored


def test_group_masked_attention_runs_a_fused_kernel_forward_and_backward():
    """What the benchmarks record on the device (sdpa_kernels): here, on CPU, the group-causal mask goes through the
    fused flash kernel in fp32 and under bf16 autocast, forward and backward, never through the unfused math path."""
    mask = group_causal_mask([1, 3, 4, 8])
    q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))

    def step(bf16: bool):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = attention(q, k, v, mask)
        out.float().sum().backward()

    for bf16 in (False, True):
        kernels = sdpa_kernels(lambda: step(bf16))
        assert kernels == [
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        ], kernels
    unfused = sdpa_kernels(lambda: torch.ops.aten._scaled_dot_product_attention_math(q, k, v, mask))
    assert unfused == ["aten::_scaled_dot_product_attention_math"]  # what the report would flag
