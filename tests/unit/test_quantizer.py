"""VectorQuantizer against the official quantiser vectors (tests/data/README.md §3) plus its invariants.

Run: .venv/bin/python -m pytest tests/unit/test_quantizer.py -q
The stored arrays use the official B x C x 1 x L layout; ours is (B, L, C), so every array is transposed once.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from restok.models.quantizer import VectorQuantizer

CASES = {"tiny_": True, "tiny_nol2_": False, "L_": True}  # prefix -> use_l2_norm


def _rows(a: np.ndarray) -> torch.Tensor:
    """(B, C, 1, L) -> (B, L, C)."""
    return torch.from_numpy(a[:, :, 0, :]).transpose(1, 2).contiguous()


def _quantizer(q, p, use_l2):
    codebook = torch.from_numpy(q[f"{p}codebook"])
    vq = VectorQuantizer(codebook.shape[0], codebook.shape[1], 0.25, use_l2_norm=use_l2)
    with torch.no_grad():
        vq.codebook.copy_(codebook)
    return vq


@pytest.mark.parametrize("p", CASES)
def test_codes_vectors_losses(vectors, p):
    q = vectors("quantizer")
    vq = _quantizer(q, p, CASES[p])
    z_q, codes, losses = vq(_rows(q[f"{p}z"]))
    assert torch.equal(codes, torch.from_numpy(q[f"{p}codes"][:, 0]).long())
    torch.testing.assert_close(z_q, _rows(q[f"{p}z_q"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(vq.lookup(codes), torch.from_numpy(q[f"{p}decoded_from_codes"]), atol=1e-6, rtol=0)
    for key in ("commitment", "codebook"):
        assert losses[key].dtype == torch.float32
        np.testing.assert_allclose(losses[key].item(), q[f"{p}{key}_loss"][0], atol=1e-6, rtol=0)
    total = losses["commitment"] + losses["codebook"]
    np.testing.assert_allclose(total.item(), q[f"{p}quantizer_loss"][0], atol=1e-6, rtol=0)
    assert q[f"{p}entropy_loss"][0] == 0  # no entropy term exists in our quantiser


def test_distances(vectors):
    q = vectors("quantizer")
    vq = _quantizer(q, "tiny_", True)
    d = vq.distances(_rows(q["tiny_z"]))  # (B, L, K)
    want = torch.from_numpy(q["tiny_distances"][:, :, 0, :]).transpose(1, 2)
    torch.testing.assert_close(d, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("p", ["tiny_", "tiny_nol2_"])
def test_straight_through_gradients(vectors, p):
    q = vectors("quantizer")
    vq = _quantizer(q, p, CASES[p])
    z = _rows(q[f"{p}z"]).requires_grad_(True)
    z_q, _, losses = vq(z)
    loss = (z_q * _rows(q[f"{p}upstream_grad"])).sum() + losses["commitment"] + losses["codebook"]
    loss.backward()
    torch.testing.assert_close(z.grad, _rows(q[f"{p}grad_z"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(vq.codebook.grad, torch.from_numpy(q[f"{p}grad_codebook"]), atol=1e-6, rtol=0)


def test_unit_norm_and_argmax_cosine():
    vq = VectorQuantizer(32, 8)
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(3, 10, 8) * 5
    z_q, codes, _ = vq(z)
    torch.testing.assert_close(z_q.norm(dim=-1), torch.ones(3, 10))
    cosine = torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(vq.codebook, dim=-1).T
    assert torch.equal(codes, cosine.argmax(-1))
    torch.testing.assert_close(vq.lookup(codes), z_q, atol=1e-6, rtol=0)


def test_fp32_under_bf16_autocast():
    vq = VectorQuantizer(16, 8)
    z = torch.randn(2, 4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, codes, losses = vq(z)
    assert z_q.dtype == torch.float32 and losses["codebook"].dtype == torch.float32
    assert codes.dtype == torch.long and codes.shape == (2, 4)


def test_codebook_init_from_data_happens_once_in_training():
    q = VectorQuantizer(16, 4, init_from_data=True)
    assert set(q.state_dict()) == {"codebook", "pending_data_init"}
    z = torch.randn(2, 8, 4)  # 16 rows for 16 codes: each row becomes one code
    q.eval()
    before = q.codebook.detach().clone()
    q(z)
    assert torch.equal(q.codebook, before)  # eval never touches the codebook
    q.train()
    _, idx, _ = q(z)
    rows = F.normalize(z.flatten(0, 1), dim=-1)
    assert torch.allclose(torch.sort(q.codebook.detach(), dim=0)[0], torch.sort(rows, dim=0)[0])
    assert len(idx.unique()) == 16  # every input has its own code
    after = q.codebook.detach().clone()
    q(torch.randn(2, 8, 4))
    assert torch.equal(q.codebook, after)  # only the first training batch


def test_dead_codes_restart_on_inputs_after_the_set_steps():
    q = VectorQuantizer(8, 4, dead_code_steps=3).train()
    z = F.normalize(torch.randn(1, 4, 4), dim=-1)
    with torch.no_grad():
        q.codebook.copy_(F.normalize(torch.randn(8, 4), dim=-1))
    used = set(q(z)[1].flatten().tolist())
    for _ in range(2):
        q(z)
    dead = [k for k in range(8) if k not in used]
    assert q.unused_steps[dead].eq(0).all()  # restarted at the third forward ...
    restarted = F.normalize(q.codebook.detach()[dead], dim=-1)
    assert all(any(torch.allclose(r, row, atol=1e-6) for row in z[0]) for r in restarted)  # ... onto inputs


def test_official_quantizer_keeps_its_state_keys():
    assert set(VectorQuantizer(16, 4).state_dict()) == {"codebook"}


def test_bypass_passes_inputs_then_quantises_with_a_data_init():
    q = VectorQuantizer(16, 4, init_from_data=True, bypass_steps=2).train()
    z = torch.randn(2, 8, 4, requires_grad=True)
    start = q.codebook.detach().clone()
    for _ in range(2):
        out, _, losses = q(z)
        assert torch.allclose(out, F.normalize(z, dim=-1)) and all(float(v) == 0 for v in losses.values())
        assert torch.equal(q.codebook, start)  # the data init waits for the first quantising forward
    out, idx, losses = q(z)
    assert torch.allclose(out, q.lookup(idx)) and float(losses["commitment"]) < 1e-10  # codes = these inputs
    assert q.train_forwards == 3 and not q.pending_data_init
    q.eval()
    assert torch.allclose(q(z)[0], q.lookup(q(z)[1]))  # eval always quantises
