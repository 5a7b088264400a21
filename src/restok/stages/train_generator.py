"""Stage `train_generator`: the HAR (or plain AR) generator trained on the cached token levels only.

    python -m restok.stages.train_generator --params params.yaml --latents data/extract_latents \
        --out data/train_generator --results results/train_generator
    RESTOK_NPROC_PER_NODE=8 python -m restok.stages.train_generator ...     # torchrun, one process per GPU

docs/method.md, generator §8, training-and-eval §4. The tokenizer is never loaded: the data are the codes
of `extract_latents` (N x views x L) and their labels. Every step draws a global batch from a seeded permutation of
the images (one per epoch, drop_last) and, for each sample, one of its views uniformly at random; both are pure
functions of (seed, step), so a resumed run and any process count read the same samples (each rank takes its slice
of the global batch). Label dropout for CFG happens inside the model. AdamW with the no-decay groups of docs/method.md, training-and-eval §3.2, linear
warmup + cosine LR, gradient clipping, EMA, bf16 autocast and fused AdamW on CUDA, DDP under torchrun.
Checkpoints every `loop.ckpt_every_steps` go to `<out>/ckpt/` (atomic, resume after kill -9 is exact on CPU).

Outputs: `<out>/generator.pt` (EMA weights, config dict, provenance); `results/.../metrics.json` (final train loss,
val loss and per-level top-1 accuracy of the EMA model on all val codes, throughput) and `curve.tsv`.
With `train_generator.official` set (the official-l profile) nothing is trained: the released generator is fetched,
imported exactly, checked against params and the latents, and evaluated on the val codes the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from restok.artifacts import save_artifact
from restok.config.generator import GeneratorParams, TrainGenerator, generator_config
from restok.config.load import stage_args
from restok.convert.released import import_released
from restok.launch import relaunch_if_requested
from restok.models.generator import HARGenerator
from restok.provenance import write_results
from restok.train import ckpt, finite, optim
from restok.train.dist import all_reduce_mean, barrier, cleanup, init_distributed, is_dist, seed_everything, use_bf16
from restok.train.ema import EMA
from restok.train.log import CurveWriter, is_main_process, print0, progress
from restok.train.lr import lr_at

# the params sections it reads (its dvc.yaml `params:`) and their types
PARAMS = {"profile": str, "generator": GeneratorParams, "train_generator": TrainGenerator}
# params that change what is logged or evaluated, not the trained weights: they do not stop a resume
NOT_SHAPING = (*(f"train_generator.{k}" for k in ckpt.LOGGING_KNOBS), "train_generator.val_batches")


class Latents:
    """One split of extract_latents: codes (N, views, L) as a memmap, labels (N,), meta.json."""

    def __init__(self, root: Path, split: str):
        d = root / split
        if not (d / "meta.json").is_file():
            raise FileNotFoundError(f"{d / 'meta.json'} is missing: extract_latents has not finished {split!r}")
        self.meta = json.loads((d / "meta.json").read_text())
        self.codes = np.load(d / "codes.npy", mmap_mode="r")  # (N, V, L)
        self.labels = np.load(d / "labels.npy")  # (N,)
        self.num, self.views, self.tokens = self.codes.shape

    def batch(self, index: np.ndarray, view: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (b, L) long and labels (b,) long of (image, view) pairs, copied to `device` without a sync."""
        codes = torch.from_numpy(self.codes[index, view].astype(np.int64))  # (b, L)
        labels = torch.from_numpy(self.labels[index].astype(np.int64))  # (b,)
        if device.type == "cuda":
            codes, labels = codes.pin_memory(), labels.pin_memory()
        return codes.to(device, non_blocking=True), labels.to(device, non_blocking=True)


class StepSampler:
    """Global batch of step s: images from a seeded per-epoch permutation (drop_last), one random view each."""

    def __init__(self, num: int, views: int, batch: int, seed: int):
        if batch > num:
            raise ValueError(f"train_generator.loop.batch_size={batch} exceeds the {num} training images")
        self.num, self.views, self.batch, self.seed = num, views, batch, seed
        self.steps_per_epoch = num // batch
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num)
        index = self._perm[i * self.batch : (i + 1) * self.batch]
        view = np.random.default_rng([self.seed, epoch, i, 1]).integers(0, self.views, self.batch)
        return index, view


@torch.no_grad()
def evaluate(
    model: HARGenerator,
    val: Latents,
    num: int,
    batch: int,
    level_sizes: list[int],
    device,
    autocast,
    rank: int,
    world: int,
) -> dict:
    """Mean CE and per-level top-1 accuracy over the first `num` val sequences (view 0), split over ranks."""
    ce_sum = torch.zeros(val.tokens, dtype=torch.float64, device=device)  # (L,)
    hit_sum = torch.zeros(val.tokens, dtype=torch.float64, device=device)  # (L,)
    for start in range(rank * batch, num, world * batch):
        index = np.arange(start, min(start + batch, num))
        codes, labels = val.batch(index, np.zeros_like(index), device)
        with autocast:
            logits, _ = model(codes, labels)  # (b, L, V)
        ce_sum += F.cross_entropy(logits.transpose(1, 2), codes, reduction="none").sum(0)
        hit_sum += (logits.argmax(-1) == codes).sum(0)
    stats = torch.stack([ce_sum, hit_sum])  # (2, L)
    if is_dist():
        torch_dist.all_reduce(stats)
    ce, acc = (stats / num).cpu().numpy()  # per position
    bounds = np.cumsum([0, *level_sizes])
    return {
        "loss": float(ce.mean()),
        "accuracy": float(acc.mean()),
        "accuracy_per_level": {
            f"level_{i}": float(acc[a:b].mean()) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
        },
    }


def sections_hash(p) -> str:
    return hashlib.sha256(
        json.dumps({k: asdict(p.sections[k]) for k in list(PARAMS)[1:]}, sort_keys=True, default=str).encode()
    ).hexdigest()


def import_generator(p, args) -> None:
    """`train_generator.official` set: no training. The released generator is fetched, imported exactly, checked
    against the params' generator section and the latents (codebook, tokens, classes), then evaluated on the val
    codes as a trained one is."""
    tg = p.train_generator
    val = Latents(Path(args.latents), "val")
    expected = generator_config(p.generator, val.meta["codebook_size"], val.meta["num_tokens"], val.meta["num_classes"])
    model, provenance = import_released(
        "generator",
        tg.official,
        "train_generator.official",
        expected,
        f"{p.path}:generator (with the latents' codebook, tokens and classes)",
    )
    device = torch.device("cuda" if tg.loop.device != "cpu" and torch.cuda.is_available() else "cpu")
    bf16 = use_bf16(tg.loop.precision, device)
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
    out, results = Path(args.out), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for stale in (out / "generator.pt", results / "metrics.json", results / "provenance.json"):
        stale.unlink(missing_ok=True)
    CurveWriter(results / "curve.tsv", ["loss", "val_loss", "lr"]).close()  # header only: nothing was trained
    model = model.to(device)
    final = evaluate(model, val, val.num, tg.loop.batch_size, val.meta["level_sizes"], device, autocast, 0, 1)
    save_artifact(
        out / "generator.pt",
        model.state_dict(),
        asdict(model.cfg),
        {
            "stage": "train_generator",
            "profile": p.profile,
            "step": None,
            "params_sha256": sections_hash(p),
            "weights": provenance["weights"],
            "official": provenance,
            "latents": {"val_meta": val.meta},
        },
    )
    metrics = {
        "steps": None,
        "final_train_loss": None,
        "val_loss": final["loss"],
        "val_accuracy": final["accuracy"],
        "val_accuracy_per_level": final["accuracy_per_level"],
        "val_sequences": val.num,
        "params_M": round(provenance["num_params"] / 1e6, 3),
    }
    run_info = {
        "profile": p.profile,
        "mode": model.cfg.mode,
        "weights": provenance["weights"],
        "official": provenance,
        "train_seconds": None,
        "device": device.type,
        "bf16": bf16,
        "tokenizer": val.meta["tokenizer"],
    }
    write_results(results / "metrics.json", metrics, run_info, device)
    print0(
        f"train_generator: imported {provenance['weights']} (nothing trained); val loss {final['loss']:.4f}, "
        f"accuracy {final['accuracy']:.4f} on {val.num} val sequences"
    )


@dataclass
class Run:
    """A training run set up by `setup`, advanced by `train` and ended by `finish` (the stage's main, read in order).
    Everything the loop changes lives here: the step, the last logged train loss, the clock."""

    p: object
    args: argparse.Namespace
    cfg: object
    info: object
    train: Latents
    val: Latents
    model: HARGenerator
    net: nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    sampler: StepSampler
    autocast: object
    bf16: bool
    run_id: str
    local: int
    val_num: int
    curve: CurveWriter | None
    step: int
    start_step: int
    prior_seconds: float  # training time of the runs this one resumes
    final_loss: float | None = None
    seconds_this_run: float = 0.0

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.args.out) / "ckpt"


def main(argv=None):
    relaunch_if_requested("restok.stages.train_generator", argv)
    args, p = stage_args(
        __doc__,
        PARAMS,
        argv,
        helps={"latents": "output of extract_latents"},
        latents="data/extract_latents",
        out="data/train_generator",
        results="results/train_generator",
    )
    if p.train_generator.official is not None:
        return import_generator(p, args)
    with ckpt.exclusive(Path(args.out) / "ckpt", is_main_process()):  # one writer of ckpt/ for the whole run
        run = setup(p, args)
        train(run)
        finish(run)


def setup(p, args: argparse.Namespace) -> Run:
    """Check the latents, build model, EMA, optimiser and sampler; resume from <out>/ckpt/ when the run matches."""
    loop, opt_cfg = p.train_generator.loop, p.train_generator.optim
    latents = Path(args.latents)
    train, val = Latents(latents, "train"), Latents(latents, "val")
    for key in ("codebook_size", "num_tokens", "num_classes", "level_sizes"):
        if train.meta[key] != val.meta[key]:
            raise ValueError(
                f"{latents}/train/meta.json has {key}={train.meta[key]} but {latents}/val/meta.json "
                f"has {val.meta[key]}; re-run extract_latents"
            )
    cfg = generator_config(
        p.generator, train.meta["codebook_size"], train.meta["num_tokens"], train.meta["num_classes"]
    )

    info = init_distributed(loop.device)
    device, rank, world = info.device, info.rank, info.world_size
    if loop.batch_size % world:
        raise ValueError(
            f"{args.params}:train_generator.loop.batch_size={loop.batch_size} must be divisible by the "
            f"{world} processes"
        )
    local = loop.batch_size // world
    bf16 = use_bf16(loop.precision, device)
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
    torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left on CUDA

    torch.manual_seed(loop.seed)  # the same initial weights on every rank
    model = HARGenerator(cfg).to(device)
    model.set_checkpointing(loop.checkpointing)
    seed_everything(loop.seed, rank)  # then one dropout stream per rank
    ema = EMA(model, loop.ema_decay)
    opt = optim.build(model, opt_cfg)
    out, results = Path(args.out), Path(args.results)
    sections = {k: asdict(p.sections[k]) for k in list(PARAMS)[1:]}
    run_id = ckpt.fingerprint(
        ckpt.run_params(sections, NOT_SHAPING),
        "restok.stages.train_generator",
        {"latents": train.meta, "world_size": world},
    )
    step, final_loss, state = 0, None, ckpt.resume(out / "ckpt", run_id, info.is_main)
    resume = state is not None
    prior_seconds = 0.0
    if resume:
        step, _ = ckpt.restore(state, model, {"generator": opt}, ema)
        final_loss = state["train_loss"]
        prior_seconds = float(state.get("train_seconds", 0.0))
        print0(f"resumed from {out / 'ckpt'} at step {step}")
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net) if loop.compile else net
    sampler = StepSampler(train.num, train.views, loop.batch_size, loop.seed)
    print0(
        f"train_generator: {cfg.mode} {sum(t.numel() for t in model.parameters()) / 1e6:.2f}M params, "
        f"{train.num} images x {train.views} views, {device} x {world}, bf16={bf16}, steps {step}.."
        f"{loop.max_steps}"
    )

    val_num = min(val.num, p.train_generator.val_batches * loop.batch_size)
    columns = ["loss", "val_loss", "lr"] if val_num else ["loss", "lr"]
    curve = (
        CurveWriter(
            results / "curve.tsv", columns, resume_step=step if resume else None, keep=out / "ckpt" / "curve.tsv"
        )
        if info.is_main
        else None
    )
    return Run(
        p=p,
        args=args,
        cfg=cfg,
        info=info,
        train=train,
        val=val,
        model=model,
        net=net,
        ema=ema,
        opt=opt,
        sampler=sampler,
        autocast=autocast,
        bf16=bf16,
        run_id=run_id,
        local=local,
        val_num=val_num,
        curve=curve,
        step=step,
        start_step=step,
        prior_seconds=prior_seconds,
        final_loss=final_loss,
    )


def train(run: Run) -> None:
    """Train from run.step to max_steps: the loss averaged and the EMA's val loss logged every `log_every_steps`,
    a checkpoint every `ckpt_every_steps` and at the end. The clock skips evaluation and checkpoint writing."""
    loop, opt_cfg = run.p.train_generator.loop, run.p.train_generator.optim
    device, rank, world, local = run.device, run.info.rank, run.info.world_size, run.local
    model, opt, level_sizes = run.model, run.opt, run.train.meta["level_sizes"]
    loss_sum, loss_steps = torch.zeros((), device=device), 0
    guard = finite.FiniteGuard("train_generator", ["loss", "grad_norm"], device)
    run.net.train()
    t0 = time.perf_counter()
    with progress(loop.max_steps, "train_generator") as bar:
        bar.advance(run.step)
        while run.step < loop.max_steps:
            lr = lr_at(run.step, opt_cfg.lr, opt_cfg.warmup_steps, loop.max_steps, opt_cfg.schedule, opt_cfg.end_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            index, view = run.sampler(run.step)
            codes, labels = run.train.batch(
                index[rank * local : (rank + 1) * local], view[rank * local : (rank + 1) * local], device
            )
            with run.autocast:
                _, loss = run.net(codes, labels, with_logits=False)  # chunked CE: no (B, L, V) fp32 logits
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = finite.grad_norm(model.parameters(), opt_cfg.grad_clip, foreach=True)
            opt.step()
            run.ema.update(model)
            loss_sum += loss.detach()
            loss_steps += 1
            run.step += 1
            step = run.step
            bar.advance(1)
            guard.record(step, torch.stack([loss.detach().float(), grad_norm.float()]))  # on the device: no sync
            saving = step % loop.ckpt_every_steps == 0 or step == loop.max_steps
            if saving or step % loop.log_every_steps == 0:  # stop at a NaN/inf before it is logged or saved
                guard.check(step, model.parameters() if saving else ())

            if step % loop.log_every_steps == 0 or step == loop.max_steps:
                run.seconds_this_run += time.perf_counter() - t0
                run.final_loss = all_reduce_mean(loss_sum / loss_steps).item()
                row = {"loss": run.final_loss, "lr": lr}
                if run.val_num:
                    row["val_loss"] = evaluate(
                        run.ema.model, run.val, run.val_num, local, level_sizes, device, run.autocast, rank, world
                    )["loss"]
                if run.curve:
                    run.curve.write(step, **row)
                print0(f"step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in row.items()))
                loss_sum, loss_steps = torch.zeros((), device=device), 0
                t0 = time.perf_counter()
            if step % loop.ckpt_every_steps == 0 or step == loop.max_steps:
                run.seconds_this_run += time.perf_counter() - t0
                state = ckpt.capture(
                    step,
                    model,
                    {"generator": opt},
                    run.ema,
                    data={"step": step},
                    config=asdict(run.cfg),
                    fingerprint=run.run_id,
                    train_loss=run.final_loss,
                    train_seconds=run.prior_seconds + run.seconds_this_run,
                )
                if run.info.is_main:
                    ckpt.save(run.ckpt_dir, state, step, keep=loop.keep_ckpts)
                barrier()
                t0 = time.perf_counter()


def finish(run: Run) -> None:
    """Evaluate the EMA on every val sequence, write generator.pt and metrics.json."""
    p, loop, cfg, step = run.p, run.p.train_generator.loop, run.cfg, run.step
    train, val, device, results = run.train, run.val, run.device, Path(run.args.results)
    final = evaluate(
        run.ema.model,
        val,
        val.num,
        run.local,
        train.meta["level_sizes"],
        device,
        run.autocast,
        run.info.rank,
        run.info.world_size,
    )
    if run.info.is_main:
        run.curve.close()
        provenance = {
            "stage": "train_generator",
            "profile": p.profile,
            "step": step,
            "params_sha256": sections_hash(p),
            "weights": "ema",
            "latents": {"train_meta": train.meta, "val_num_images": val.num},
        }
        save_artifact(Path(run.args.out) / "generator.pt", run.ema.model.state_dict(), asdict(cfg), provenance)
        train_secs = run.seconds_this_run
        sequences = (step - run.start_step) * loop.batch_size
        metrics = {
            "steps": step,
            "final_train_loss": run.final_loss,
            "val_loss": final["loss"],
            "val_accuracy": final["accuracy"],
            "val_accuracy_per_level": final["accuracy_per_level"],
            "val_sequences": val.num,
            "params_M": round(sum(t.numel() for t in run.model.parameters()) / 1e6, 3),
        }
        run_info = {
            "profile": p.profile,
            "mode": cfg.mode,
            "sequences_per_s": round(sequences / train_secs, 2) if train_secs else None,
            "train_seconds": round(run.prior_seconds + train_secs, 2),
            "steps_this_run": step - run.start_step,
            "world_size": run.info.world_size,
            "device": device.type,
            "bf16": run.bf16,
            "compile": loop.compile,
            "tokenizer": train.meta["tokenizer"],
        }
        results.mkdir(parents=True, exist_ok=True)
        write_results(results / "metrics.json", metrics, run_info, device)
    barrier()
    cleanup()


if __name__ == "__main__":
    main()
