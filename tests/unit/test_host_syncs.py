"""No host syncs in the hot loops: the tokenizer's and the generator's training forward + loss + backward, and the
sampling loop. On a GPU each read of a device value on the host (`.item()`, `int(t)`, `bool(t)`, `nonzero`, a
Python `if` on a tensor) stalls the CPU until the GPU has caught up; all of them go through the ATen ops below, so
a dispatch mode sees them on CPU as well. The tokenizer runs with every quantiser switch on (data init, dead-code
restarts, the bypass), whose bookkeeping used to read its buffers each step.
"""

import dataclasses
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from restok.losses.loss_config import LossConfig
from restok.losses.recon import TokenizerLoss
from restok.models.generator import HARGenerator, generator_config
from restok.models.tokenizer import PRESETS, ResTok
from restok.sampling import generate
from restok.sampling_config import SamplingConfig
from restok.train.finite import FiniteGuard, NonFiniteLoss

SYNCING_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal"}


class HostSyncs(TorchDispatchMode):
    """Records every op that hands a tensor's value to the host, with where it was called."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNCING_OPS:
            self.calls.append(func._schema.name + "\n" + "".join(traceback.format_stack(limit=8)[:-1]))
        return func(*args, **(kwargs or {}))


def test_tokenizer_training_step_never_reads_a_device_value():
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        PRESETS["restok-smoke/8"], codebook_init="data", dead_code_steps=1, quantizer_bypass_steps=1
    )
    model = ResTok(cfg).train()
    loss_fn = TokenizerLoss(LossConfig(lpips_weight=0.0, gan_weight=0.0))
    x = torch.rand(4, 3, 32, 32)
    t_cls, t_patches = torch.randn(4, cfg.vf_dim), torch.randn(4, model.image_grid[0] * model.image_grid[1], cfg.vf_dim)
    for step in range(4):  # bypassed, data init, then dead-code restarts (a code unused for one step restarts)
        with HostSyncs() as syncs:
            o = model(x)
            loss, _ = loss_fn(
                x,
                o.recon,
                o.quant_loss,
                step=step,
                teacher_cls=t_cls,
                teacher_patches=t_patches,
                enc_tokens_proj=o.enc_cls_feat[:, None],
                dec_feat_proj=o.dec_patch_feat,
            )
            loss.backward()
        assert not syncs.calls, f"step {step}:\n" + "\n".join(syncs.calls)
    assert not model.quantizer.pending_data_init and int(model.quantizer.train_forwards) == 4


def test_quantizer_flags_follow_a_loaded_state_dict():
    """The host copies of the quantiser's flags come back from a checkpoint: a resumed run neither re-initialises
    the codebook from data nor bypasses the quantiser again."""
    cfg = dataclasses.replace(PRESETS["restok-smoke/8"], codebook_init="data", quantizer_bypass_steps=2)
    trained = ResTok(cfg).train()
    for _ in range(3):
        trained(torch.rand(2, 3, 32, 32))
    resumed = ResTok(cfg).train()
    resumed.load_state_dict(trained.state_dict())
    before = resumed.quantizer.codebook.detach().clone()
    z = torch.randn(2, 5, cfg.code_dim)
    out, _, losses = resumed.quantizer(z)
    assert torch.equal(resumed.quantizer.codebook, before)  # no second data init
    assert float(losses["codebook"].detach()) > 0 and not torch.allclose(out, torch.nn.functional.normalize(z, dim=-1))


def test_generator_training_step_and_sampling_loop_never_read_a_device_value():
    torch.manual_seed(0)
    model = HARGenerator(generator_config("har-smoke", vocab_size=80, num_tokens=16, num_classes=10)).train()
    codes, labels = torch.randint(0, 80, (4, 16)), torch.randint(0, 10, (4,))
    with HostSyncs() as syncs:
        model(codes, labels)[1].backward()
    assert not syncs.calls, "\n".join(syncs.calls)
    uniforms = torch.Generator().manual_seed(0)
    sampling = SamplingConfig(cfg_scale=2.0, top_k=8, top_p=0.9)
    with HostSyncs() as syncs:
        generate(model.eval(), labels, sampling, generator=uniforms)
    assert not syncs.calls, "\n".join(syncs.calls)


def test_the_non_finite_guard_records_every_step_without_reading_a_device_value():
    """Both training loops record each step's losses and gradient norm; only `check`, at the logging interval and
    before a save, reads them. The first non-finite step is the one reported."""
    guard = FiniteGuard("train_x", ["loss", "grad_norm"], torch.device("cpu"))
    steps = [torch.tensor(v) for v in ([1.0, 2.0], [float("nan"), 1.0], [3.0, float("inf")])]
    with HostSyncs() as syncs:
        for step, values in enumerate(steps, 1):
            guard.record(step, values)
    assert not syncs.calls, "\n".join(syncs.calls)
    with pytest.raises(NonFiniteLoss, match=r"train_x: non-finite loss at step 2 \(loss nan, grad_norm 1\)"):
        guard.check(3)
