"""Stage `train_tokenizer`: train ResTok with MSE + LPIPS + VQ + VF alignment (+ GAN), keep an EMA, evaluate it.

    python -m restok.stages.train_tokenizer --params params.yaml --shards data/shard \
        --features data/cache_features --out data/train_tokenizer --results results/train_tokenizer
    torchrun --standalone --nproc_per_node=8 -m restok.stages.train_tokenizer ...    # or RESTOK_NPROC_PER_NODE=8

docs/method.md, training-and-eval §2 (losses), §3 (procedure), §5.1 (reconstruction metrics). One iteration (training-and-eval §3.5): tokenizer
forward under bf16 autocast (`loop.precision`; VQ, pixel decoder and losses in fp32), L_G backward, global
grad-norm clip, AdamW step (weight-decay groups of 3.2, warmup + cosine LR of 3.3); from `gan_start_step` the
discriminator step on (x, sg(x_hat)) with its own optimiser and step counter; then the EMA update (3.4).

Data: each sample is one training view of one train image. With cached features (`vf.mode: cache`) it is one of
the image's cached views, chosen by a generator seeded with (seed, epoch, image), and the VF loss compares the
tokenizer with the teacher's features of exactly that crop; without them a fresh view is drawn the same way.
Shards are read by random access (tar member offsets), so the order is a pure function of (seed, epoch): every
epoch is one seeded permutation of all images split over the ranks, and a resumed run (kill -9 included) continues
at the same sample with the same model, optimisers, EMA and RNG, bit for bit on CPU.

Outputs: data/train_tokenizer/tokenizer.pt (EMA weights, model config, provenance; with `export_step` the EMA of
that step, kept in ckpt/export_ema.pt when it is reached), ckpt/ (resume state),
results/train_tokenizer/metrics.json (PSNR/SSIM/codebook stats of the EMA on `eval_images` val images, a
mean-image PSNR baseline, PSNR per token prefix, which losses and weights were used), curve.tsv, recon.png
(originals, then reconstructions from 1, 2, 4, ..., L tokens, one row each).

With `train_tokenizer.official` set (the official-l profile) nothing is trained: the released checkpoint is fetched
(hub cache or local file), imported exactly (restok.convert), checked against params and evaluated the same way;
its provenance replaces the training record (curve.tsv keeps only its header).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from restok.artifacts import save_artifact
from restok.config.features import Vf
from restok.config.load import stage_args
from restok.config.tokenizer import TokenizerParams, TrainTokenizer, tokenizer_config
from restok.convert.released import import_released
from restok.cpus import loader_workers
from restok.data.features import TarIndex, read_features_manifest
from restok.data.shards import MANIFEST, decode_image, iter_split, iter_split_uint8, read_manifest
from restok.data.shards import shard_paths
from restok.data.views import apply_view, eval_view, to_uint8_tensor, train_view_boxes
from restok.hashing import sha256_file
from restok.io import save_png, save_torch_atomic
from restok.launch import relaunch_if_requested
from restok.losses.recon import TokenizerLoss
from restok.metrics import codebook_stats, psnr, ssim
from restok.models.teacher import build_teacher, teacher_dim
from restok.models.tokenizer import ResTok
from restok.provenance import write_results
from restok.train import ckpt, dist, finite, optim
from restok.train.ema import EMA
from restok.train.log import CurveWriter, console, is_main_process, print0, progress
from restok.train.lr import lr_at

# the params sections it reads (its dvc.yaml `params:`) and their types
PARAMS = {"profile": str, "vf": Vf, "tokenizer": TokenizerParams, "train_tokenizer": TrainTokenizer}
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")
# params that change what is logged or evaluated, not the trained weights: they do not stop a resume
NOT_SHAPING = (
    *(f"train_tokenizer.{k}" for k in ckpt.LOGGING_KNOBS),
    "train_tokenizer.eval_images",
    "train_tokenizer.baseline_train_images",
)
EXPORT_EMA = "export_ema.pt"  # in ckpt/ (kept across resumes): the EMA weights of train_tokenizer.export_step


# --------------------------------------------------------------------------------------------------- data
class ViewDataset(Dataset):
    """(image index, draw seed) -> (view uint8 (3, res, res), teacher CLS (D,), teacher patches (P, D)).

    With cached features the view is one of the image's cached views (chosen with the draw seed) and the teacher
    tensors are its cached fp16 features; without, a fresh `train_view_boxes` view and empty tensors.
    """

    def __init__(self, shard_dir: str, image_manifest: dict, features_dir: str | None, views: int):
        self.res, self.views = image_manifest["resolution"], views
        self.images = [TarIndex(p) for p in shard_paths(shard_dir, image_manifest)]
        self.features = None
        if features_dir is not None:
            names = [Path(p).name for p in shard_paths(shard_dir, image_manifest)]
            self.features = [TarIndex(Path(features_dir) / name) for name in names]
            for img, feat in zip(self.images, self.features):
                if img.keys != feat.keys:
                    raise ValueError(
                        f"{feat.path} holds {len(feat.keys)} samples that do not match the "
                        f"{len(img.keys)} of {img.path}; rerun cache_features (dvc repro cache_features)"
                    )
        self.records = [(s, key) for s, index in enumerate(self.images) for key in index.keys]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item):
        index, draw = item
        shard, key = self.records[index]
        rng = np.random.default_rng(draw)
        fields = self.images[shard].members[key]
        field = next(f for f in IMAGE_FIELDS if f in fields)
        img = decode_image({field: self.images[shard].read(key, field), "__key__": key})
        if self.features is None:
            box, cls, patches = train_view_boxes(img.size, self.res, 1, rng)[0], torch.empty(0), torch.empty(0)
        else:
            feat, v = self.features[shard], int(rng.integers(self.views))
            box = feat.npy_row(key, "views.npy", v)
            cls = torch.from_numpy(feat.npy_row(key, "cls.npy", v).copy())  # (D,) fp16
            patches = torch.from_numpy(feat.npy_row(key, "patches.npy", v).copy())  # (P, D) fp16
        return apply_view(img, box, self.res), cls, patches


class EpochSampler(Sampler):
    """Infinite: epoch e is the permutation rng(seed, e) of all images, cut to a multiple of the world size and
    split by rank; yields (image, (seed, e, image)) from item `start` of this rank's stream (the data position)."""

    def __init__(self, n: int, rank: int, world: int, seed: int, start: int):
        self.n, self.rank, self.world, self.seed, self.start = n, rank, world, seed, start
        self.per_rank = n // world
        if self.per_rank == 0:
            raise ValueError(f"{n} training images cannot be split over {world} processes")

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)[: self.per_rank * self.world]
            for i in order[self.rank :: self.world][offset:].tolist():
                yield i, (self.seed, epoch, i)
            epoch, offset = epoch + 1, 0


def collate(batch):
    views, cls, patches = zip(*batch)
    return torch.stack(views), torch.stack(cls), torch.stack(patches)


# ------------------------------------------------------------------------------------------------ checks
@dataclasses.dataclass(frozen=True)
class VFSource:
    """Where the VF alignment targets come from: `need` (some VF weight > 0 with vf_align on), `cached` (read from
    cache_features' shards) or computed online by the teacher; the teacher's width `dim`; for a cache its
    provenance, views per image and manifest sha256; `reason` says why in words."""

    need: bool
    cached: bool
    dim: int | None
    reason: str
    views: int = 1
    provenance: dict | None = None
    manifest_sha256: str | None = None


def vf_setup(p, shards: str, features: str) -> VFSource:
    """Which VF source the run uses; refuses a stale feature cache."""
    vf, cfg, loss = p.vf, p.tokenizer, p.train_tokenizer.loss
    manifest_path = Path(features) / MANIFEST
    manifest = read_features_manifest(features)
    if not cfg.vf_align:
        return VFSource(need=False, cached=False, dim=None, reason="off (tokenizer.vf_align false)")
    need = loss.vf_enc_weight > 0 or loss.vf_dec_weight > 0
    if vf.mode == "online" or not need:
        dim = teacher_dim(vf.teacher)  # the width only; weights are loaded below when the teacher runs
        return VFSource(need=need, cached=False, dim=dim, reason="online teacher" if need else "off (weight 0)")
    image_sha = sha256_file(Path(shards) / "train" / MANIFEST)
    facts = {
        "cached": (manifest["cached"], True),
        "teacher": (manifest["teacher"], vf.teacher),
        "grid": (manifest.get("grid"), vf.grid),
        "image_shards_manifest_sha256": (manifest["image_shards_manifest_sha256"], image_sha),
    }
    for name, (found, expected) in facts.items():
        if found != expected:
            raise ValueError(
                f"{manifest_path} says {name}={found!r} but {p.path} / {shards} give {expected!r}; "
                f"rerun cache_features (dvc repro cache_features)"
            )
    return VFSource(
        need=True,
        cached=True,
        dim=manifest["dim"],
        reason="cached teacher features",
        views=manifest["views_per_image"],
        provenance=manifest["provenance"],
        manifest_sha256=sha256_file(manifest_path),
    )


def params_hash(p) -> str:
    tree = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in p.sections.items()}
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def class_mean_images(shards: str, res: int, num_classes: int, limit: int | None):
    """Baselines from the train split (eval view, at most `limit` images in shard order): per-class mean images
    (C, 3, res, res) in [0, 1], the global mean image (1, 3, res, res), and the number of images read; None when
    the train split is empty (the official-l profile shards val only)."""
    sums = torch.zeros(num_classes, 3, res, res, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for key, img, label in iter_split(shards, "train"):
        if limit is not None and counts.sum() >= limit:
            break
        if not 0 <= label < num_classes:
            raise ValueError(
                f"{shards}/train: sample {key} has label {label}, outside the {num_classes} classes of "
                f"the train manifest"
            )
        sums[label] += to_uint8_tensor(eval_view(img, res)).double() / 255
        counts[label] += 1
    if counts.sum() == 0:
        return None
    seen = counts > 0
    class_means = torch.where(
        seen[:, None, None, None], sums / counts.clamp(min=1)[:, None, None, None], sums[seen].sum(0) / counts.sum()
    )  # a class absent from the prefix: global mean
    return class_means.float(), (sums.sum(0) / counts.sum()).float()[None], int(counts.sum())


def trained_prefixes(cfg) -> list[int]:
    """Token prefixes that nested dropout trains: keep lengths (>= min_tokens) with a nonzero probability."""
    return [n for n, prob in zip(cfg.keep_lengths, cfg.keep_probs) if prob > 0]


@torch.no_grad()
def evaluate(
    model: ResTok, shards: str, n: int, device: torch.device, batch: int, baseline_images: int | None, show: int = 8
):
    """EMA model in fp32 on the first `n` val images (docs/method.md, training-and-eval §5.1): PSNR/SSIM after clamping and 8-bit rounding,
    codebook usage, PSNR of each trained token prefix (the others are listed as untrained), and two baselines on
    the same images: the mean train image of the image's class and the mean train image; and the recon.png tiles."""
    model.eval()
    images, labels = [], []  # uint8: 50k val images at 256 px are 9.8 GB, four times that as floats
    for _, img, label in iter_split_uint8(shards, "val"):
        images.append(img)
        labels.append(label)
        if len(images) == n:
            break
    x_all, labels = torch.stack(images), torch.tensor(labels)  # (N, 3, H, W) uint8, (N,)
    count, res = len(x_all), x_all.shape[-1]
    num_classes = read_manifest(shards, "train")["num_classes"]
    baseline = class_mean_images(shards, res, num_classes, baseline_images)
    prefixes = list(accumulate(model.level_sizes))
    sums = {"psnr": 0.0, "ssim": 0.0, "class_mean": 0.0, "global_mean": 0.0, **{k: 0.0 for k in prefixes}}
    codes_all = []
    for i in range(0, count, batch):
        x = x_all[i : i + batch].to(device).float() / 255
        if baseline is not None:
            class_means, global_mean, _ = baseline
            sums["class_mean"] += float(psnr(class_means[labels[i : i + batch]].to(device), x).sum())
            sums["global_mean"] += float(psnr(global_mean.to(device).expand_as(x), x).sum())
        codes = model.encode(x)  # (b, L)
        codes_all.append(codes.cpu())
        for k in prefixes:
            recon = (model.decode(codes, k).clamp(0, 1) * 255).round() / 255
            sums[k] += float(psnr(recon, x).sum())
            if k == prefixes[-1]:
                sums["psnr"] += float(psnr(recon, x).sum())
                sums["ssim"] += float(ssim(recon, x).sum())
    # recon.png: `show` images spread over the (class-ordered) val split, each decoded from every prefix
    pick = torch.linspace(0, count - 1, min(show, count)).round().long()
    codes = torch.cat(codes_all)[pick].to(device)
    tiles = [x_all[pick].float() / 255] + [model.decode(codes, k).clamp(0, 1).cpu() for k in prefixes]
    stats = codebook_stats(torch.cat(codes_all), model.level_sizes, model.cfg.codebook_size)
    trained = trained_prefixes(model.cfg)
    has = baseline is not None
    metrics = {
        "eval_images": count,
        "psnr": sums["psnr"] / count,
        "ssim": sums["ssim"] / count,
        "class_mean_image_psnr": sums["class_mean"] / count if has else None,
        "global_mean_image_psnr": sums["global_mean"] / count if has else None,
        "psnr_above_class_mean_db": (sums["psnr"] - sums["class_mean"]) / count if has else None,
        "baseline_train_images": baseline[2] if has else 0,
        "psnr_by_prefix": {str(k): sums[k] / count for k in prefixes if k in trained},
        "untrained_prefixes": [k for k in prefixes if k not in trained],
        "codebook": stats,
    }
    rows = ["original", *[f"{k} tokens" + ("" if k in trained else " (untrained)") for k in prefixes]]
    return metrics, torch.cat(tiles), rows


# ---------------------------------------------------------------------------------------------------- main
@dataclasses.dataclass
class Run:
    """A training run set up by `setup`, advanced by `train` and ended by `finish` (the stage's main, read in order).
    Everything the loop changes lives here: the step, the running means of the logged losses, the clock."""

    p: object
    args: argparse.Namespace
    cfg: object
    vfs: VFSource
    info: object
    model: ResTok
    net: torch.nn.Module
    ema: EMA
    opts: dict
    loss_fn: TokenizerLoss
    teacher: torch.nn.Module | None
    loader: object
    run_id: str
    bf16: bool
    columns: list
    curve: CurveWriter | None
    local_bs: int
    step: int
    resumed: int | None
    prior_seconds: float
    disc_params: list
    start_step: int = 0
    logged: int = 0
    acc: torch.Tensor | None = None
    acc_n: int = 0
    t_start: float = 0.0
    seconds_this_run: float = 0.0

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.args.out) / "ckpt"


def main(argv=None):
    relaunch_if_requested("restok.stages.train_tokenizer", argv)
    args, p = stage_args(
        __doc__,
        PARAMS,
        argv,
        shards="data/shard",
        features="data/cache_features",
        out="data/train_tokenizer",
        results="results/train_tokenizer",
    )
    if p.train_tokenizer.official is not None:
        return import_tokenizer(p, args)
    with ckpt.exclusive(Path(args.out) / "ckpt", is_main_process()):  # one writer of ckpt/ for the whole run
        run = setup(p, args)
        train(run)
        finish(run)


def setup(p, args: argparse.Namespace) -> Run:
    """Check the inputs, build model, EMA, optimisers, loss and data; resume from ckpt/ when the run matches."""
    tt, loop, opt_cfg = p.train_tokenizer, p.train_tokenizer.loop, p.train_tokenizer.optim
    image_manifest = read_manifest(args.shards, "train")
    res = image_manifest["resolution"]
    vfs = vf_setup(p, args.shards, args.features)
    cfg = tokenizer_config(p.tokenizer, res, vfs.dim)
    if vfs.need and cfg.grid != (p.vf.grid, p.vf.grid):
        raise ValueError(
            f"{p.path}: vf.grid={p.vf.grid} but the tokenizer's image-token grid is {cfg.grid[0]} "
            f"(data resolution {res} from {args.shards}/train/{MANIFEST}); set vf.grid={cfg.grid[0]}"
        )
    loss_cfg = tt.loss if cfg.vf_align else dataclasses.replace(tt.loss, vf_enc_weight=0.0, vf_dec_weight=0.0)
    teacher = (
        build_teacher(p.vf.teacher, p.vf.weights, revision=p.vf.revision, sha256=p.vf.sha256)
        if vfs.need and not vfs.cached
        else None
    )
    dist.seed_everything(loop.seed)
    loss_fn = TokenizerLoss(loss_cfg)  # LPIPS / discriminator weights checked here, before any work

    info = dist.init_distributed(loop.device)
    device = info.device
    if loop.batch_size % info.world_size:
        raise ValueError(
            f"{p.path}: train_tokenizer.loop.batch_size={loop.batch_size} is not divisible by the "
            f"{info.world_size} processes"
        )
    local_bs = loop.batch_size // info.world_size
    out, results, ckpt_dir = Path(args.out), Path(args.results), Path(args.out) / "ckpt"
    sections = {k: dataclasses.asdict(p.sections[k]) for k in list(PARAMS)[1:]}
    run_id = ckpt.fingerprint(
        ckpt.run_params(sections, NOT_SHAPING),
        "restok.stages.train_tokenizer",
        {
            "features_manifest_sha256": vfs.manifest_sha256,
            "image_shards": image_manifest["shards"],
            "world_size": info.world_size,
        },
    )

    dist.seed_everything(loop.seed)  # the same init on every rank
    model = ResTok(cfg).to(device)
    model.set_checkpointing(loop.checkpointing)
    ema = EMA(model, loop.ema_decay)
    loss_fn = loss_fn.to(device).train()
    teacher = teacher.to(device) if teacher is not None else None
    opts = {"tokenizer": optim.build(model, opt_cfg)}
    if loss_fn.gan is not None:
        opts["discriminator"] = optim.adamw(
            loss_fn.gan.discriminator, tt.disc_lr, opt_cfg.weight_decay, tuple(opt_cfg.betas)
        )
    dist.seed_everything(loop.seed, info.rank)
    step, resumed, prior_seconds = 0, None, 0.0
    state = ckpt.resume(ckpt_dir, run_id, info.is_main)
    if state is not None:
        step, _ = ckpt.restore(state, model, opts, ema)
        prior_seconds = float(state.get("train_seconds", 0.0))  # training time before the interruption
        if loss_fn.gan is not None:
            loss_fn.gan.load_state_dict(state["gan"])
        resumed = step
    if info.is_main:
        for stale in (out / "tokenizer.pt", *(results / n for n in ("metrics.json", "provenance.json", "recon.png"))):
            stale.unlink(missing_ok=True)
    dist.barrier()

    dataset = ViewDataset(args.shards, image_manifest, args.features if vfs.cached else None, vfs.views)
    sampler = EpochSampler(len(dataset), info.rank, info.world_size, loop.seed, step * local_bs)
    loader = iter(
        DataLoader(
            dataset,
            batch_size=local_bs,
            sampler=sampler,
            num_workers=loader_workers(loop.workers),
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            drop_last=True,
            generator=torch.Generator().manual_seed(loop.seed),
        )
    )  # not the global RNG: resume
    if loop.compile:
        model.compile_regions()  # after the EMA copy: evaluation runs the plain EMA model
    net = model
    if info.world_size > 1:
        unused = cfg.vf_align and not (loss_cfg.vf_enc_weight > 0 and loss_cfg.vf_dec_weight > 0)
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
        )
    bf16 = dist.use_bf16(loop.precision, device)
    disc_params = [q for q in loss_fn.gan.discriminator.parameters() if q.requires_grad] if loss_fn.gan else []
    columns = ["loss", *loss_terms(loss_cfg), *(["d_loss"] if loss_fn.gan else []), "lr"]
    curve = CurveWriter(results / "curve.tsv", columns, resumed, keep=ckpt_dir / "curve.tsv") if info.is_main else None
    print0(
        f"train_tokenizer: {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M params, device {device}, "
        f"world {info.world_size}, bf16 {bf16}, optimizer {opt_cfg.algorithm}, VF {vfs.reason}, "
        + (f"resumed from step {resumed}" if resumed is not None else "fresh start")
    )
    return Run(
        p=p,
        args=args,
        cfg=cfg,
        vfs=vfs,
        info=info,
        model=model,
        net=net,
        ema=ema,
        opts=opts,
        loss_fn=loss_fn,
        teacher=teacher,
        loader=loader,
        run_id=run_id,
        bf16=bf16,
        columns=columns,
        curve=curve,
        local_bs=local_bs,
        step=step,
        resumed=resumed,
        prior_seconds=prior_seconds,
        disc_params=disc_params,
        start_step=step,
        logged=step,
    )


def train(run: Run, deadline: float | None = None, steps: int | None = None) -> None:
    """Train from run.step to max_steps, logging, checkpointing and exporting on the way; with a `deadline`
    (time.time()) stop at the first step that ends after it, with `steps` after that many. Called once by the stage; in pieces by
    benchmarks/time_to_target.py, which evaluates in between."""
    p, tt, loop, opt_cfg = run.p, run.p.train_tokenizer, run.p.train_tokenizer.loop, run.p.train_tokenizer.optim
    device, loss_fn, model = run.device, run.loss_fn, run.model
    last = loop.max_steps if steps is None else min(loop.max_steps, run.step + steps)
    guard = finite.FiniteGuard("train_tokenizer", [*run.columns[:-1], "grad_norm"], device)
    t_start = time.time()
    with progress(last - run.step, "train_tokenizer", every=loop.log_every_steps) as bar:
        while run.step < last and (deadline is None or time.time() < deadline):
            views, t_cls, t_patches = next(run.loader)
            x = views.to(device, non_blocking=True).float() / 255  # (B, 3, H, W) in [0, 1]
            if run.teacher is not None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.bf16):
                    t_cls, t_patches = run.teacher(x, grid=(p.vf.grid, p.vf.grid))
            t_cls = t_cls.to(device, non_blocking=True).float() if run.vfs.need else None
            t_patches = t_patches.to(device, non_blocking=True).float() if run.vfs.need else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.bf16):
                o = run.net(x)
            loss, logs = loss_fn(
                x,
                o.recon,
                o.quant_loss,
                step=run.step,
                teacher_cls=t_cls,
                teacher_patches=t_patches if t_patches is None else t_patches[: len(o.dec_patch_feat)],
                enc_tokens_proj=o.enc_cls_feat[:, None] if o.enc_cls_feat is not None else None,
                dec_feat_proj=o.dec_patch_feat,
            )
            lr = lr_at(
                run.step,
                opt_cfg.lr,
                opt_cfg.warmup_steps,
                loop.max_steps,
                end_lr=opt_cfg.end_lr,
                schedule=opt_cfg.schedule,
            )
            grad_norm = apply_step(run.opts["tokenizer"], loss, model.parameters(), lr, opt_cfg.grad_clip)
            values = [loss.detach(), *(logs[c] for c in run.columns[1:-1] if c != "d_loss")]
            if loss_fn.gan is not None:
                d_loss = torch.zeros((), device=device)
                if loss_fn.gan.active(run.step):
                    d_loss, _ = loss_fn.gan.discriminator_loss(x, o.recon.detach())
                    apply_step(
                        run.opts["discriminator"],
                        d_loss,
                        run.disc_params,
                        disc_lr(run.step, tt, loop),
                        opt_cfg.grad_clip,
                        average_grads=True,
                    )
                values.append(d_loss.detach())
            run.ema.update(model)
            run.step += 1
            row = torch.stack([v.float() for v in values])
            guard.record(run.step, torch.cat([row, grad_norm.float().view(1)]))  # on the device: no sync
            saving = run.step % loop.ckpt_every_steps == 0 or run.step in (tt.export_step, loop.max_steps)
            if saving or run.step % loop.log_every_steps == 0:  # stop at a NaN/inf before it is logged or saved
                guard.check(run.step, [*model.parameters(), *run.disc_params] if saving else ())
            run.acc, run.acc_n = (row if run.acc is None else run.acc + row), run.acc_n + 1
            if run.step % loop.log_every_steps == 0 or run.step == loop.max_steps:
                mean = dist.all_reduce_mean(run.acc / run.acc_n).tolist()
                if run.curve is not None:
                    run.curve.write(run.step, **dict(zip(run.columns, [*mean, lr])))
                run.acc, run.acc_n = None, 0
                bar.advance(run.step - run.logged, **dict(zip(run.columns, mean)))
                run.logged = run.step
            if run.step == tt.export_step and run.step < loop.max_steps and run.info.is_main:  # before the ckpt
                save_torch_atomic(
                    {k: v.detach().cpu() for k, v in run.ema.model.state_dict().items()}, run.ckpt_dir / EXPORT_EMA
                )
            if run.step % loop.ckpt_every_steps == 0 or run.step == loop.max_steps:
                extra = {"gan": loss_fn.gan.state_dict()} if loss_fn.gan is not None else {}
                seconds = run.prior_seconds + run.seconds_this_run + time.time() - t_start
                state = ckpt.capture(
                    run.step,
                    model,
                    run.opts,
                    run.ema,
                    data={"samples_per_rank": run.step * run.local_bs},
                    fingerprint=run.run_id,
                    train_seconds=seconds,
                    **extra,
                )
                if run.info.is_main:
                    ckpt.save(run.ckpt_dir, state, run.step, keep=loop.keep_ckpts)
                dist.barrier()
    run.seconds_this_run += time.time() - t_start


def finish(run: Run) -> dict | None:
    """Evaluate the EMA (or the exported step's EMA), write tokenizer.pt, metrics.json, recon.png; returns metrics."""
    p, tt, loop, cfg = run.p, run.p.train_tokenizer, run.p.train_tokenizer.loop, run.cfg
    out, results = Path(run.args.out), Path(run.args.results)
    train_seconds = run.prior_seconds + run.seconds_this_run  # over every (resumed) run of this training
    if run.curve is not None:
        run.curve.close()
    metrics = None
    if run.info.is_main:
        ema_step = run.step if tt.export_step is None else tt.export_step
        if (
            ema_step < run.step
        ):  # the EMA of `export_step` is what is evaluated and exported (docs/method.md, restok §4 #6: 750k of 1M)
            run.ema.model.load_state_dict(ckpt.load(run.ckpt_dir / EXPORT_EMA))
        metrics, tiles, rows = evaluate(
            run.ema.model, run.args.shards, tt.eval_images, run.device, run.local_bs, tt.baseline_train_images
        )
        save_png(tiles, results / "recon.png", nrow=len(tiles) // len(rows))
        teacher_info = run.vfs.provenance or (run.teacher.provenance if run.teacher is not None else None)
        losses = loss_report(run.loss_fn.cfg, cfg, run.vfs, run.loss_fn, loop.max_steps)
        provenance = {
            "params_hash": params_hash(p),
            "step": run.step,
            "ema_step": ema_step,
            "profile": p.profile,
            "teacher": teacher_info,
            "losses": losses,
            "features_manifest_sha256": run.vfs.manifest_sha256,
        }
        state_dict = {k: v.detach().cpu() for k, v in run.ema.model.state_dict().items()}
        out.mkdir(parents=True, exist_ok=True)
        save_artifact(out / "tokenizer.pt", state_dict, dataclasses.asdict(cfg), provenance)
        trained = run.step - run.start_step
        metrics.update(
            {
                "step": run.step,
                "ema_step": ema_step,
                "num_params_millions": round(sum(q.numel() for q in run.model.parameters()) / 1e6, 3),
            }
        )
        run_info = {
            "profile": p.profile,
            "teacher": teacher_info,
            "losses": losses,
            "train_seconds": round(train_seconds, 2),
            "steps_this_run": trained,
            "train_images_per_second": round(trained * loop.batch_size / max(run.seconds_this_run, 1e-9), 2),
            "world_size": run.info.world_size,
            "device": str(run.device),
            "bf16": run.bf16,
            "optimizer": tt.optim.algorithm,
            "resumed_from_step": run.resumed,
            "recon_png_rows": rows,
        }
        write_results(results / "metrics.json", metrics, run_info, run.device)
        console.print(
            f"train_tokenizer: EMA PSNR {metrics['psnr']:.2f} dB ({metrics['psnr_above_class_mean_db']:+.2f}"
            f" dB above the class-mean image), SSIM {metrics['ssim']:.3f}, "
            f"{run_info['train_images_per_second']} img/s, "
            f"{train_seconds:.1f} s"
        )
    dist.barrier()
    dist.cleanup()
    return metrics


def import_tokenizer(p, args) -> None:
    """`train_tokenizer.official` set: no training. The released tokenizer is fetched, imported exactly, checked
    against the params' tokenizer section and the val shards' resolution, then evaluated as a trained one is."""
    tt = p.train_tokenizer
    res = read_manifest(args.shards, "val")["resolution"]
    expected = tokenizer_config(dataclasses.replace(p.tokenizer, vf_align=False), res, None)
    model, provenance = import_released(
        "tokenizer",
        tt.official,
        "train_tokenizer.official",
        expected,
        f"{p.path}:tokenizer (with the val shards' resolution {res})",
    )
    device = torch.device("cuda" if tt.loop.device != "cpu" and torch.cuda.is_available() else "cpu")
    out, results = Path(args.out), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for stale in (out / "tokenizer.pt", *(results / n for n in ("metrics.json", "provenance.json", "recon.png"))):
        stale.unlink(missing_ok=True)
    CurveWriter(results / "curve.tsv", ["loss", *loss_terms(tt.loss), "lr"]).close()  # header only: nothing trained
    metrics, tiles, rows = evaluate(
        model.to(device), args.shards, tt.eval_images, device, tt.loop.batch_size, tt.baseline_train_images
    )
    save_png(tiles, results / "recon.png", nrow=len(tiles) // len(rows))
    provenance_out = {
        "params_hash": params_hash(p),
        "step": None,
        "profile": p.profile,
        "teacher": None,
        "losses": None,
        "features_manifest_sha256": None,
        "official": provenance,
    }
    out.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_artifact(out / "tokenizer.pt", state_dict, dataclasses.asdict(model.cfg), provenance_out)
    metrics.update({"step": None, "num_params_millions": round(provenance["num_params"] / 1e6, 3)})
    run_info = {
        "profile": p.profile,
        "weights": provenance["weights"],
        "official": provenance,
        "teacher": None,
        "losses": "none: released checkpoint, not trained here",
        "train_seconds": None,
        "device": str(device),
        "recon_png_rows": rows,
    }
    write_results(results / "metrics.json", metrics, run_info, device)
    console.print(
        f"train_tokenizer: imported {provenance['weights']} (nothing trained); PSNR {metrics['psnr']:.2f} "
        f"dB on {metrics['eval_images']} val images"
    )


def loss_terms(loss_cfg) -> list[str]:
    """The loss components TokenizerLoss logs for this config, in its order."""
    terms = ["mse", "quant"]
    terms += ["lpips"] if loss_cfg.lpips_weight > 0 else []
    terms += ["vf_enc"] if loss_cfg.vf_enc_weight > 0 else []
    terms += ["vf_dec"] if loss_cfg.vf_dec_weight > 0 else []
    return terms + (["gan_g"] if loss_cfg.gan_weight > 0 else [])


def loss_report(loss_cfg, cfg, vfs: VFSource, loss_fn: TokenizerLoss, max_steps: int) -> dict:
    """Each term: its weight and the weights source of its frozen model, or why it is off."""
    built = loss_fn.provenance
    off = "off (tokenizer.vf_align false)" if not cfg.vf_align else "off (weight 0)"
    report = {"mse": "on (weight 1)", "vq": f"on (weight 1, commitment {cfg.commitment_cost})"}
    lpips = built.get("lpips", {})
    sha = f", sha256 {lpips['sha256']}" if "sha256" in lpips else ""
    report["lpips"] = (
        f"on (weight {loss_cfg.lpips_weight}, {lpips['weights']}{sha}, heads {lpips['heads']})"
        if loss_cfg.lpips_weight > 0
        else "off (weight 0)"
    )
    source = "cached" if vfs.cached else "online"
    for name in ("vf_enc", "vf_dec"):
        weight = getattr(loss_cfg, f"{name}_weight")
        report[name] = f"on (weight {weight}, teacher features {source})" if weight > 0 else off
    if loss_cfg.gan_weight == 0:
        report["gan"] = "off (weight 0)"
    elif loss_cfg.gan_start_step >= max_steps:
        report["gan"] = f"off (gan_start_step {loss_cfg.gan_start_step} >= max_steps {max_steps})"
    else:
        report["gan"] = (
            f"on from step {loss_cfg.gan_start_step} (weight {loss_cfg.gan_weight}, "
            f"{built['discriminator']['model']} {built['discriminator']['weights']})"
        )
    return report


def apply_step(
    opt: torch.optim.Optimizer, loss: torch.Tensor, params, lr: float, clip: float, average_grads: bool = False
) -> torch.Tensor:
    """zero_grad, backward, (average gradients over ranks), clip the global norm, set the LR, step; returns the
    global gradient norm before clipping (a device tensor)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [q for q in params if q.grad is not None]
    if average_grads and dist.is_dist():  # parameters outside DDP (the discriminator heads)
        for q in params:
            torch.distributed.all_reduce(q.grad, op=torch.distributed.ReduceOp.AVG)
    norm = finite.grad_norm(params, clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return norm


def disc_lr(step: int, tt, loop) -> float:
    """Discriminator LR: the same warmup + cosine rule on its own counter (step - gan_start_step, docs/method.md, training-and-eval §3.3); its
    end LR keeps the tokenizer's end/base ratio."""
    total = loop.max_steps - tt.loss.gan_start_step
    end = tt.optim.end_lr * tt.disc_lr / tt.optim.lr if tt.optim.lr > 0 else 0.0
    return lr_at(step - tt.loss.gan_start_step, tt.disc_lr, min(tt.optim.warmup_steps, total - 1), total, end_lr=end)


if __name__ == "__main__":
    main()
