"""Training plumbing: lr schedule, EMA, AdamW groups, atomic checkpoints and exact resume, curves, progress, dist.

Run: .venv/bin/python -m pytest tests/unit/test_train_plumbing.py -q
The resume test is the unit-level half of the kill -9 goal: 3 steps, checkpoint, fresh objects with scrambled RNG,
restore, 3 more steps must equal 6 uninterrupted steps bit for bit on CPU (dropout, data noise from torch, numpy and
random all depend on the restored RNG streams). The DDP paths run in a one-process gloo group.
"""

import dataclasses
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
from torch import nn

from restok import artifacts
from restok.io import save_torch_atomic
from restok.config.generator import generator_config as model_generator_config
from restok.config.load import load_params
from restok.config.profiles import write_profile
from restok.config.tokenizer import tokenizer_config
from restok.convert.official import generator_slots
from restok.convert.tokenizer import tokenizer_slots
from restok.models.generator import HARGenerator, generator_config
from restok.models.tokenizer import PRESETS as TOKENIZER_PRESETS
from restok.models.tokenizer import ResTok
from restok.train import ckpt, dist, log, optim
from restok.train.ema import EMA, ema_decay
from restok.train.lr import lr_at


# ------------------------------------------------------------------------------------------------------- lr
@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.0), (2_500, 5e-5), (5_000, 1e-4), (750_000, 2.3306e-5), (1_000_000, 1e-5), (1_200_000, 1e-5)],
)
def test_lr_tokenizer_schedule_matches_spec(step, expected):
    got = lr_at(step, base_lr=1e-4, warmup_steps=5_000, max_steps=1_000_000, schedule="cosine", end_lr=1e-5)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-12)


def test_lr_constant_and_midpoint():
    assert lr_at(10, 1.0, 20, 100, "constant") == 0.5
    assert lr_at(90, 1.0, 20, 100, "constant") == 1.0
    assert lr_at(60, 1.0, 20, 100, "cosine", end_lr=0.2) == pytest.approx(0.6)  # halfway down the cosine
    assert lr_at(60, 1.0, 20, 100, "linear", end_lr=0.2) == pytest.approx(0.6)  # halfway down the line
    assert lr_at(40, 1.0, 20, 100, "linear", end_lr=0.2) == pytest.approx(0.8)
    assert lr_at(100, 1.0, 20, 100, "linear", end_lr=0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="schedule='step'"):
        lr_at(0, 1.0, 0, 10, "step")
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, 1.0, 10, 10)


# ------------------------------------------------------------------------------------------------------ EMA
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(8, 2)
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


def test_ema_decay_warmup_values():
    assert [ema_decay(k, 0.9999) for k in range(1, 5)] == [0.0, 2 / 11, 3 / 12, 4 / 13]
    assert ema_decay(10**6, 0.9999) == 0.9999


def test_ema_math_frozen_and_buffers():
    model = Tiny()
    ema = EMA(model, max_decay=0.5)
    history = []
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(5, 4))  # moves BatchNorm running stats
        history.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model)
    expected = history[0]["fc1.weight"]  # k = 1 copies
    for k in range(2, 5):
        decay = min(0.5, k / (9 + k))
        expected = expected - (1 - decay) * (expected - history[k - 1]["fc1.weight"])
    torch.testing.assert_close(ema.model.fc1.weight, expected, rtol=0, atol=1e-6)
    assert torch.equal(ema.model.frozen, model.frozen)  # frozen: copied
    assert torch.equal(ema.model.norm.running_mean, model.norm.running_mean)  # buffers: copied
    assert not any(p.requires_grad for p in ema.model.parameters())

    restored = EMA(Tiny(), max_decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 4 and restored.max_decay == 0.5
    assert torch.equal(restored.model.fc2.bias, ema.model.fc2.bias)


@pytest.fixture
def gloo_group(tmp_path):
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch_dist.destroy_process_group()


def test_ema_and_capture_with_ddp(gloo_group):
    model = Tiny()
    plain = EMA(model)
    wrapped = nn.parallel.DistributedDataParallel(model)
    ema = EMA(wrapped)
    assert set(ema.model.state_dict()) == set(model.state_dict())  # no "module." prefix
    model(torch.randn(3, 4))
    ema.update(wrapped)
    plain.update(model)
    for a, b in zip(ema.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(a, b)
    state = ckpt.capture(0, wrapped, {}, ema)
    assert set(state["model"]) == set(model.state_dict()) and len(state["rng"]) == 1
    assert dist.is_dist() and torch.equal(dist.all_reduce_mean(torch.tensor([2.0, 4.0])), torch.tensor([2.0, 4.0]))


# --------------------------------------------------------------------------------------------- AdamW groups
class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_qkv = nn.Linear(8, 24)
        self.ln_post = nn.LayerNorm(8)
        self.tok_embeddings = nn.Embedding(10, 8)
        self.latent_tokens = nn.Parameter(torch.zeros(4, 8))
        self.mask_token = nn.Parameter(torch.zeros(1, 8))
        self.conv_out = nn.Conv2d(8, 8, 3)
        self.ls_gamma = nn.Parameter(torch.ones(8))
        self.teacher = nn.Linear(8, 8).requires_grad_(False)


def test_param_groups_membership():
    decay, no_decay = optim.param_groups(Named(), weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["param_names"] == ["attn_qkv.weight", "conv_out.weight"]
    assert sorted(no_decay["param_names"]) == sorted(
        [
            "attn_qkv.bias",
            "ln_post.weight",
            "ln_post.bias",
            "tok_embeddings.weight",
            "latent_tokens",
            "mask_token",
            "conv_out.bias",
            "ls_gamma",
        ]
    )
    only_ndim = optim.param_groups(Named(), 0.1, no_decay_names=lambda name: False)
    assert "latent_tokens" in only_ndim[0]["param_names"] and "ls_gamma" in only_ndim[1]["param_names"]


def _groups(model: nn.Module) -> tuple[set[str], set[str]]:
    decay, no_decay = optim.param_groups(model, weight_decay=0.1)
    return set(decay["param_names"]), set(no_decay["param_names"])


def _official_decayed(slots) -> set[str]:
    """Our names of the tensors the official rule decays, judged on the official names and shapes."""
    return {
        slot.ours
        for slot in slots
        if all(len(shape) >= 2 and not any(k in key for k in optim.NO_DECAY_KEYWORDS) for key, shape in slot.official)
    }


def test_decay_groups_match_the_official_rule_on_official_names():
    """The paper-size tokenizer and generator (meta device): our name rule gives the groups the official rule gives
    on the official names of the same tensors (key tables of restok.convert)."""
    with torch.device("meta"):
        tokenizer, generator = ResTok(TOKENIZER_PRESETS["restok-L/128"]), HARGenerator(generator_config("har-L"))
    for model, slots in ((tokenizer, tokenizer_slots(tokenizer)), (generator, generator_slots(generator))):
        decay, _ = _groups(model)
        assert decay == _official_decayed(slots)


def test_decay_groups_of_the_default_profile_models(tmp_path):
    """The models `make run` trains: embeddings, level embeddings, query tokens and the codebook are not decayed."""
    p = load_params(write_profile("default", tmp_path / "params.yaml"))
    section = dataclasses.replace(p.tokenizer, latent_init="learned", image_queries="learned")  # every token kind
    tokenizer = ResTok(tokenizer_config(section, p.data.resolution, vf_dim=16))
    generator = HARGenerator(model_generator_config(p.generator, vocab_size=64, num_tokens=32, num_classes=10))
    decay, no_decay = _groups(tokenizer)
    assert {
        "quantizer.codebook",
        "encoder.image_level_emb",
        "encoder.latent_level_emb",
        "decoder.latent_level_emb",
        "encoder.latent_init.tokens",
        "decoder.image_queries.tokens",
        "decoder.feature_queries.tokens",
    } <= no_decay
    assert {
        "encoder.blocks.0.attn.qkv.weight",
        "decoder.head.weight",
        "vf_enc_proj.weight",
        "pixel_encoder.layers.0.weight",
        "encoder.proj.linears.0.weight",
    } <= decay
    decay, no_decay = _groups(generator)
    assert {"tok_emb.weight", "cls_emb.table.weight", "special_emb.weight"} <= no_decay
    assert decay == {
        name for name, param in generator.named_parameters() if param.ndim >= 2 and "emb" not in name
    }  # attention, SwiGLU and the output head


def test_adamw_cpu_uses_foreach():
    opt = optim.adamw(Named(), lr=1e-4, weight_decay=1e-4)
    group = opt.param_groups[0]
    assert group["foreach"] and not group["fused"] and group["betas"] == (0.9, 0.95)
    assert sum(len(g["params"]) for g in opt.param_groups) == 10  # the frozen teacher is left out


# ------------------------------------------------------------------------------------------------ checkpoints
def test_latest_ignores_tmp_of_killed_writer(tmp_path):
    state = {"step": 1, "w": torch.arange(3)}
    ckpt.save(tmp_path, state, step=1)
    (tmp_path / "step_000000002.pt.tmp.4242").write_bytes(b"\x80\x02half a pickle")  # killed before os.replace
    assert ckpt.latest(tmp_path).name == "step_000000001.pt"
    assert torch.equal(ckpt.load(ckpt.latest(tmp_path))["w"], torch.arange(3))
    ckpt.save(tmp_path, state, step=3)  # the next save clears stale temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000001.pt", "step_000000003.pt"]


def test_failed_write_leaves_nothing(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        save_torch_atomic({"x": Unpicklable()}, tmp_path / "step_000000004.pt")
    assert list(tmp_path.iterdir()) == [] and ckpt.latest(tmp_path) is None


def test_keep_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save(tmp_path, {"step": step}, step, keep=2)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step_000000030.pt", "step_000000040.pt"]
    assert ckpt.load(ckpt.latest(tmp_path))["step"] == 40
    assert ckpt.latest(tmp_path / "missing") is None


def _train(model, opt, ema, start, stop):
    """Steps depend on torch (data, dropout), numpy and python RNG streams."""
    for step in range(start, stop):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 1e-2, warmup_steps=2, max_steps=10)
        x = torch.randn(6, 4) + float(np.random.rand()) + random.random()
        loss = model.train()(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)


def _build():
    model = Tiny()
    return model, optim.adamw(model, lr=1e-2, weight_decay=0.1), EMA(model, 0.9)


def test_resume_is_bitwise_identical(tmp_path):
    dist.seed_everything(7)
    model, opt, ema = _build()
    _train(model, opt, ema, 0, 6)
    reference = (model.state_dict(), ema.state_dict()["model"], opt.state_dict())

    dist.seed_everything(7)
    model, opt, ema = _build()
    _train(model, opt, ema, 0, 3)
    ckpt.save(tmp_path, ckpt.capture(3, model, {"model": opt}, ema, data={"samples_seen": 18}), step=3)

    dist.seed_everything(123)  # a restarted process: different streams and weights until restored
    model, opt, ema = _build()
    step, data = ckpt.restore(ckpt.load(ckpt.latest(tmp_path)), model, {"model": opt}, ema)
    assert step == 3 and data == {"samples_seen": 18} and ema.num_updates == 3
    _train(model, opt, ema, step, 6)

    for got, want in zip((model.state_dict(), ema.state_dict()["model"]), reference[:2]):
        for key in want:
            assert torch.equal(got[key], want[key]), key
    got_opt, want_opt = opt.state_dict(), reference[2]
    for index, slots in want_opt["state"].items():
        for name, value in slots.items():
            assert torch.equal(got_opt["state"][index][name], value), (index, name)
    assert got_opt["param_groups"] == want_opt["param_groups"]


def test_restore_refuses_other_optimizers(tmp_path):
    model, opt, ema = _build()
    state = ckpt.capture(0, model, {"tokenizer": opt}, ema)
    with pytest.raises(ValueError, match="discriminator"):
        ckpt.restore(state, model, {"tokenizer": opt, "discriminator": opt}, ema)


def test_artifact_roundtrip_and_refusals(tmp_path):
    model = Tiny()
    path = tmp_path / "tokenizer.pt"
    config = {"width": 8, "levels": [1, 1, 2], "name": "tiny"}
    artifacts.save_artifact(path, model.state_dict(), config, {"step": 3, "params_sha256": "ab" * 32})
    state_dict, got_config, provenance = artifacts.load_artifact(path)
    assert got_config == config and provenance["step"] == 3
    assert torch.equal(state_dict["fc1.weight"], model.fc1.weight)
    with pytest.raises(TypeError, match=r"config.width"):
        artifacts.save_artifact(tmp_path / "bad.pt", {}, {"width": np.int64(8)}, {})
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")  # the error names the file (it was torch's alone)
    with pytest.raises(ValueError, match=r"garbage\.pt is not a readable restok model artifact \(UnpicklingError"):
        artifacts.load_artifact(tmp_path / "garbage.pt")
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"truncated\.pt is not a readable restok model artifact \(RuntimeError"):
        artifacts.load_artifact(tmp_path / "truncated.pt")
    save_torch_atomic({"step": 1}, tmp_path / "not_artifact.pt")
    with pytest.raises(ValueError, match="not a restok model artifact"):
        artifacts.load_artifact(tmp_path / "not_artifact.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        artifacts.load_artifact(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------ curves, progress
def test_curve_writer_resume_truncates(tmp_path):
    path = tmp_path / "curve.tsv"
    with log.CurveWriter(path, ["loss", "lr"]) as curve:
        for step in range(1, 6):
            curve.write(step, loss=1.0 / step, lr=1e-4)
    with open(path, "a") as f:
        f.write("6\t0.16")  # half-written row of a killed run
    with log.CurveWriter(path, ["loss", "lr"], resume_step=3) as curve:
        curve.write(4, loss=0.5, lr=2e-4)
    lines = path.read_text().splitlines()
    assert lines == ["step\tloss\tlr", "1\t1\t0.0001", "2\t0.5\t0.0001", "3\t0.333333\t0.0001", "4\t0.5\t0.0002"]
    with pytest.raises(ValueError, match="header"):
        log.CurveWriter(path, ["loss"], resume_step=3)
    with pytest.raises(ValueError, match="expected"):
        log.CurveWriter(path, ["loss", "lr"]).write(1, loss=0.1)
    log.CurveWriter(path, ["loss", "lr"]).close()  # a fresh run starts over
    assert path.read_text() == "step\tloss\tlr\n"


def test_curve_history_survives_the_orchestrator_deleting_the_curve(tmp_path):
    """DVC and Snakemake delete results/<stage>/curve.tsv (an output) before rerunning the stage; the copy kept
    beside the checkpoints gives a resumed run its history back."""
    path, keep = tmp_path / "results" / "curve.tsv", tmp_path / "ckpt" / "curve.tsv"
    with log.CurveWriter(path, ["loss"], keep=keep) as curve:
        for step in range(1, 5):
            curve.write(step, loss=1.0 / step)
    path.unlink()
    with log.CurveWriter(path, ["loss"], resume_step=2, keep=keep) as curve:
        curve.write(3, loss=0.25)
    want = "step\tloss\n1\t1\n2\t0.5\n3\t0.25\n"
    assert path.read_text() == want and keep.read_text() == want
    log.CurveWriter(path, ["loss"], keep=keep).close()  # a fresh start clears both
    assert path.read_text() == keep.read_text() == "step\tloss\n"


def test_progress_plain_lines_when_not_interactive():
    assert not log.console.is_interactive  # pytest captures stdout: the Snakemake/SLURM case
    with log.console.capture() as captured:
        with log.progress(10, "encode", every=4) as bar:
            for _ in range(10):
                bar.advance(1, loss=0.25)
    lines = captured.get().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["encode: 4/10", "encode: 8/10", "encode: 10/10"]
    assert all(line.endswith("loss 0.25") and "\x1b" not in line for line in lines)


def test_logs_go_to_stderr_verbatim_and_unwrapped():
    text = "saved " + "/very/long/folder" * 12 + "/data/[bold]run[/bold]:emoji:/x.pt"
    r = subprocess.run(
        [sys.executable, "-c", f"from restok.train.log import print0; print0({text!r})"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert r.returncode == 0 and r.stdout == "" and r.stderr == text + "\n"


def test_print0_only_on_rank0(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with log.console.capture() as captured:
        log.print0("hidden")
    monkeypatch.setenv("RANK", "0")
    with log.console.capture() as shown:
        log.print0("shown")
    assert captured.get() == "" and shown.get().strip() == "shown"


# ------------------------------------------------------------------------------------------------------ dist
def test_single_process_without_torchrun_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = dist.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.is_main, info.device.type) == (0, 1, True, "cpu")
    assert not dist.is_dist()
    value = torch.tensor([1.5])
    mean = dist.all_reduce_mean(value)
    assert torch.equal(mean, value) and mean is not value
    dist.barrier()
    dist.cleanup()
    with pytest.raises(ValueError, match="device='tpu'"):
        dist.init_distributed(device="tpu")


def test_each_rank_says_where_it_runs(monkeypatch, capsys):
    """A rank of a multi-process run prints its rank, node (SLURM's node name, else the host) and threads: in a
    multi-node job's log, one line per rank shows that every node took part."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("SLURMD_NODENAME", "n2")
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: True)  # as if torchrun's group were joined
    info = dist.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.is_main) == (1, 2, False)
    assert capsys.readouterr().out == (
        f"restok: rank 1 of 2 (local rank 0) on n2, device cpu, {torch.get_num_threads()} CPU threads\n"
    )
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key)
    dist.init_distributed(device="cpu")
    assert capsys.readouterr().out == ""  # one process: nothing to say


def test_seed_everything_offsets_by_rank():
    draws = []
    for rank in (0, 1, 0):
        assert dist.seed_everything(5, rank) == 5 + rank
        draws.append((torch.rand(1).item(), float(np.random.rand()), random.random()))
    assert draws[0] == draws[2] and all(not math.isclose(a, b) for a, b in zip(draws[0], draws[1]))


def test_muon_follows_torch_muon_in_fp32():
    # the same algorithm as torch.optim.Muon's "match_rms_adamw" rule; only the orthogonalisation dtype differs
    # (fp32 here on a CPU, bf16 in torch's), so the two agree to bf16 rounding
    torch.manual_seed(0)
    ours_w = torch.nn.Parameter(torch.randn(48, 24))
    ref_w = torch.nn.Parameter(ours_w.detach().clone())
    ours = optim.Muon([ours_w], lr=0.02, weight_decay=0.1)
    ref = torch.optim.Muon([ref_w], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grad = torch.randn(48, 24)
        ours_w.grad, ref_w.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    assert torch.allclose(ours_w, ref_w, atol=2e-3) and not torch.equal(ours_w, ref_w)
    singular = torch.linalg.svdvals(optim.orthogonalise(torch.randn(24, 48)))
    assert singular.min() > 0.5 and singular.max() < 1.5  # Newton-Schulz's near-orthogonal output
    assert optim.orthogonalise(torch.randn(24, 48)).dtype == torch.float32


def test_build_muon_splits_weight_matrices_from_the_rest():
    from restok.config.training import Optim

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LayerNorm(4), torch.nn.Linear(4, 5)
    )
    opt = optim.build(model, Optim(lr=1e-3, algorithm="muon"))
    muon = {n for g in opt.optimizers["muon"].param_groups for n in g["param_names"]}
    adamw = [n for g in opt.optimizers["adamw"].param_groups for n in g["param_names"]]
    assert muon == {"3.weight"} and sorted(adamw) == ["0.bias", "0.weight", "2.bias", "2.weight", "3.bias"]
    for group in opt.param_groups:  # the loop sets every group's LR through the one object
        group["lr"] = 0.5
    assert {g["lr"] for o in opt.optimizers.values() for g in o.param_groups} == {0.5}
    model(torch.randn(2, 3, 3, 3)).sum().backward()
    opt.step()
    state = opt.state_dict()
    fresh = optim.build(model, Optim(lr=1e-3, algorithm="muon"))
    fresh.load_state_dict(state)
    assert torch.equal(
        fresh.optimizers["muon"].state_dict()["state"][0]["momentum_buffer"],
        state["muon"]["state"][0]["momentum_buffer"],
    )
    assert isinstance(optim.build(model, Optim(lr=1e-3)), torch.optim.AdamW)
