"""The training speed-ups against the plain eager path, on tiny models in fp32 on CPU.

Run: .venv/bin/python -m pytest tests/unit/test_speed.py -q
Activation checkpointing (`loop.checkpointing`) recomputes blocks in the backward pass, and the generator's training
loss is a chunked cross-entropy that never holds the whole fp32 logits; neither may change the loss or any
gradient. torch.compile (`loop.compile`: the tokenizer by region, the generator whole) must give them within 1e-4.
The compile tests use the aot_eager backend (graph capture, guards and recompiles per block shape, AOT autograd
with the checkpointed regions), which compiles the tiny tokenizer in seconds; inductor's C++ code generation for
its graphs takes 1.5 to 2.5 min on a 2-core CPU, so the suite uses aot_eager and
`RESTOK_TEST_COMPILE_BACKEND=inductor` runs the same test with the real compiler.
Each test builds two models with the same weights, runs one training forward + backward on
the same batch from the same RNG state (nested dropout, label and token dropout draw from it) and compares the loss
and every parameter's gradient.
"""

import copy
import os

import pytest
import torch

from restok.models.generator import HARGenerator, generator_config
from restok.models.tokenizer import PRESETS, ResTok

BACKEND = os.environ.get("RESTOK_TEST_COMPILE_BACKEND", "aot_eager")
VOCAB = 80  # the tiny generator's; unlike its width (64), so logits are told apart from activations by shape


def _tokenizer_loss(model: ResTok, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # the nested-dropout draw
    out = model(x)
    return (
        (out.recon - x).square().mean()
        + out.quant_loss
        + out.dec_patch_feat.square().mean()
        + out.enc_cls_feat.square().mean()
    )


def _generator_loss(
    model: HARGenerator, codes: torch.Tensor, labels: torch.Tensor, seed: int, with_logits: bool = True
) -> torch.Tensor:
    torch.manual_seed(seed)  # label, token, residual and FFN dropout
    return model(codes, labels, with_logits=with_logits)[1]


def _tiny_generator() -> HARGenerator:
    model = HARGenerator(generator_config("har-smoke", vocab_size=VOCAB, num_tokens=16, num_classes=10)).train()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # the zero-init head would give the trunk no gradient
    return model


def count_calls(module: torch.nn.Module) -> list:
    """A list that grows by one at every forward of `module` (recomputation included)."""
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))  # pre: recomputation may stop early
    return calls


def assert_same_loss_and_grads(
    ref: torch.nn.Module, fast: torch.nn.Module, loss_ref: torch.Tensor, loss_fast: torch.Tensor, atol: float
) -> None:
    loss_ref.backward()
    loss_fast.backward()
    torch.testing.assert_close(loss_fast, loss_ref, atol=atol, rtol=0)
    grads = {name: p.grad for name, p in ref.named_parameters() if p.grad is not None}
    fast_grads = {name: p.grad for name, p in fast.named_parameters() if p.grad is not None}
    assert fast_grads.keys() == grads.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(fast_grads[name], g, atol=atol, rtol=0, msg=f"gradient of {name}")


@pytest.mark.parametrize("mode", ["blocks", "all"])
def test_tokenizer_checkpointing_keeps_loss_and_grads(mode):
    ref = ResTok(PRESETS["restok-tiny/32"]).train()
    fast = copy.deepcopy(ref)
    fast.set_checkpointing(mode)
    vit_calls, cnn_calls = count_calls(fast.encoder.blocks[0]), count_calls(fast.pixel_decoder.layers[1])
    x = torch.rand(2, 3, 64, 64)
    assert_same_loss_and_grads(ref, fast, _tokenizer_loss(ref, x, 1), _tokenizer_loss(fast, x, 1), atol=1e-5)
    assert (len(vit_calls), len(cnn_calls)) == (2, 2 if mode == "all" else 1)  # recomputed in backward


def test_generator_checkpointing_keeps_loss_and_grads():
    ref = _tiny_generator()
    fast = copy.deepcopy(ref)
    fast.set_checkpointing("blocks")
    calls = count_calls(fast.blocks[-1])
    codes, labels = torch.randint(0, VOCAB, (4, 16)), torch.tensor([0, 3, 5, 9])
    assert_same_loss_and_grads(
        ref, fast, _generator_loss(ref, codes, labels, 2), _generator_loss(fast, codes, labels, 2), atol=1e-5
    )
    assert len(calls) == 2  # recomputed in backward


def test_generator_chunked_loss_keeps_loss_and_grads_without_whole_logits(monkeypatch):
    """with_logits=False (the training step): the chunked cross-entropy equals the full one, and no tensor of the
    size of the whole logits is kept for the backward pass."""
    monkeypatch.setattr("restok.models.generator.LOSS_CHUNK", 4)  # 16 positions: 4 chunks
    ref = _tiny_generator()
    fast = copy.deepcopy(ref)
    codes, labels = torch.randint(0, VOCAB, (4, 16)), torch.tensor([0, 3, 5, 9])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss_fast = _generator_loss(fast, codes, labels, 3, with_logits=False)
    logits_like = [shape.numel() for shape in saved if len(shape) and shape[-1] == VOCAB]
    assert max(logits_like, default=0) <= 4 * 4 * VOCAB  # one chunk at most, never the (4, 16, V) logits
    assert_same_loss_and_grads(ref, fast, _generator_loss(ref, codes, labels, 3), loss_fast, atol=1e-5)


def test_tokenizer_regional_compile_keeps_loss_and_grads():
    """The training stage's fast path, `compile_regions` with checkpointing 'all', against eager; then a second step
    reuses the compiled graphs (every block shape was compiled once, nothing falls back), and the evaluation's encode
    and decode under no_grad compile too (they hit dynamo's recompile limit and ran eager before compile_regions
    raised it)."""
    torch._dynamo.reset()
    ref = ResTok(PRESETS["restok-tiny/32"]).train()
    fast = copy.deepcopy(ref)
    fast.set_checkpointing("all")
    fast.compile_regions(backend=BACKEND)
    x = torch.rand(2, 3, 64, 64)
    assert_same_loss_and_grads(ref, fast, _tokenizer_loss(ref, x, 1), _tokenizer_loss(fast, x, 1), atol=1e-4)
    frames = dict(torch._dynamo.utils.counters["frames"])
    fast.zero_grad()
    _tokenizer_loss(fast, x, 1).backward()
    assert dict(torch._dynamo.utils.counters["frames"]) == frames and frames["ok"] >= 1
    fast.eval()
    with torch.no_grad():
        fast.decode(fast.encode(x))
    frames = dict(torch._dynamo.utils.counters["frames"])
    assert frames["total"] == frames["ok"], f"a compiled region fell back to eager: {frames}"


def test_generator_compiled_training_step_keeps_loss_and_grads():
    """train_generator's step with loop.compile and loop.checkpointing 'blocks': the whole model compiled, the chunked
    loss, against the eager full-logits loss."""
    torch._dynamo.reset()
    ref = _tiny_generator()
    fast = copy.deepcopy(ref)
    fast.set_checkpointing("blocks")
    net = torch.compile(fast, backend="aot_eager", dynamic=False)
    codes, labels = torch.randint(0, VOCAB, (4, 16)), torch.tensor([0, 3, 5, 9])
    assert_same_loss_and_grads(
        ref,
        fast,
        _generator_loss(ref, codes, labels, 4),
        _generator_loss(net, codes, labels, 4, with_logits=False),
        atol=1e-4,
    )
