"""Stage `sample`: class-balanced images from the EMA generator, decoded by the EMA tokenizer (docs/method.md, generator
§3-5, docs/method.md, training-and-eval §5.2).

    python -m restok.stages.sample --params params.yaml --generator data/train_generator/generator.pt \
        --tokenizer data/train_tokenizer/tokenizer.pt --out data/sample --results results/sample
    RESTOK_NPROC_PER_NODE=2 python -m restok.stages.sample ...        # the same images on 2 processes

Both models are rebuilt from the configs stored in their artifacts; the generator's vocabulary and token count must
equal the tokenizer's codebook size and token count. Image i (class i // sample.per_class) draws its codes with seed
sample.seed + i through the KV-cache sampler (CFG schedule, top-k/top-p from sample.sampling), so a rerun gives the
same images, and so does any number of processes: each rank takes a contiguous run of whole global batches, rank 0
gathers and writes. Decoding is fp32, images = uint8(clamp(255 x, 0, 255)) (truncation, as the official script).
The generator's passes run in sample.precision (auto: bf16 on CUDA, fp32 on CPU); with sample.compile its cached pass
is compiled per block size (CUDA graphs on a GPU) over one static KV cache per batch size.

Writes data/sample/samples.npz (ADM layout: arr_0 uint8 N x H x W x 3, arr_1 int64 labels), results/sample/grid.png
(one row per class) and results/sample/summary.json (sampling steps, images/s of generation and of decoding). With
`sample.untrained_baseline` it also writes data/sample/untrained.npz: the same images (classes, seeds, sampling) from
a generator of the same config with fresh weights (seed sample.seed), whose gFID `score` reports as the baseline that
shows whether training did anything.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid

from restok.artifacts import load_models
from restok.config.load import stage_args
from restok.config.sample import Sample
from restok.images import UNTRAINED, gather_to_main, rank_share, sample_images, sampling_bf16
from restok.io import save_png, write_npz_atomic
from restok.launch import relaunch_if_requested
from restok.models.generator import HARGenerator
from restok.provenance import write_results
from restok.sampling import compile_sampling, schedule_scales
from restok.train.dist import barrier, cleanup, init_distributed
from restok.train.log import console, print0

# the params sections it reads (its dvc.yaml `params:`) and their types
PARAMS = {"profile": str, "sample": Sample}


# ------------------------------------------------------------------------------------------------- outputs
def write_grid(path: Path, images: np.ndarray, labels: np.ndarray, num_classes: int, per_row: int) -> None:
    """One row per class with its first `per_row` images (black tiles where a class has fewer)."""
    tiles = torch.zeros(num_classes, per_row, *images.shape[1:], dtype=torch.uint8)  # (C, n, H, W, 3)
    for c in range(num_classes):
        mine = torch.from_numpy(images[labels == c][:per_row])
        tiles[c, : len(mine)] = mine
    grid = make_grid(tiles.flatten(0, 1).permute(0, 3, 1, 2).float() / 255, nrow=per_row, padding=1)
    save_png(grid, path)


def main(argv=None):
    relaunch_if_requested("restok.stages.sample", argv)
    args, p = stage_args(
        __doc__,
        PARAMS,
        argv,
        generator="data/train_generator/generator.pt",
        tokenizer="data/train_tokenizer/tokenizer.pt",
        out="data/sample",
        results="results/sample",
    )
    cfg = p.sample
    info = init_distributed(cfg.device)
    generator, tokenizer, provenance = load_models(args.generator, args.tokenizer, info.device)

    out, results = Path(args.out), Path(args.results)
    if info.is_main:  # a rerun never leaves the previous run's files next to a half-done one
        for stale in [
            out / "samples.npz",
            out / UNTRAINED,
            *(results / n for n in ("summary.json", "provenance.json", "grid.png")),
            *out.glob("*.tmp*"),
        ]:
            stale.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        results.mkdir(parents=True, exist_ok=True)

    num_classes = generator.cfg.num_classes
    n_images = num_classes * cfg.per_class
    steps = len(generator.cfg.block_sizes)
    print0(
        f"sample: {n_images} images ({num_classes} classes x {cfg.per_class}) in {steps} sampling steps on "
        f"{info.world_size} process(es), cfg {cfg.sampling.cfg_scale} ({cfg.sampling.cfg_schedule})"
    )
    bf16 = sampling_bf16(cfg.precision, info.device)
    t0 = time.perf_counter()
    share = rank_share(n_images, cfg.batch_size, info.rank, info.world_size)
    if cfg.compile:
        compile_sampling(generator)
    images, timing = sample_images(
        generator, tokenizer, cfg.sampling, share, cfg.per_class, cfg.seed, cfg.batch_size, info.device, bf16
    )
    parts = gather_to_main((images, timing), info)
    untrained = None
    if cfg.untrained_baseline:  # same config, sampling, seeds and images; fresh weights (the same on every rank)
        torch.manual_seed(cfg.seed)
        fresh = HARGenerator(generator.cfg).to(info.device).eval()
        if cfg.compile:
            compile_sampling(fresh)
        untrained, _ = sample_images(
            fresh,
            tokenizer,
            cfg.sampling,
            share,
            cfg.per_class,
            cfg.seed,
            cfg.batch_size,
            info.device,
            bf16,
            desc="sample (untrained generator)",
        )
        untrained = gather_to_main(untrained, info)
    if info.is_main:
        images = np.concatenate([part[0] for part in parts])  # (N, H, W, 3) in global index order
        labels = np.arange(n_images, dtype=np.int64) // cfg.per_class  # (N,)
        write_npz_atomic(out / "samples.npz", arr_0=images, arr_1=labels)
        if untrained is not None:
            write_npz_atomic(out / UNTRAINED, arr_0=np.concatenate(untrained), arr_1=labels)
        write_grid(results / "grid.png", images, labels, num_classes, min(cfg.grid_per_class, cfg.per_class))
        gen_s = max(part[1]["generate_seconds"] for part in parts)  # the slowest rank bounds the wall time
        dec_s = max(part[1]["decode_seconds"] for part in parts)
        summary = {
            "num_images": n_images,
            "num_classes": num_classes,
            "per_class": cfg.per_class,
            "resolution": tokenizer.cfg.resolution,
            "num_tokens": generator.cfg.num_tokens,
            "sampling_steps": steps,
            "block_sizes": generator.cfg.block_sizes,
            "cfg_scale_per_step": schedule_scales(cfg.sampling, steps),
        }
        run_info = {
            "profile": p.profile,
            "generator_mode": generator.cfg.mode,
            "cfg": dataclasses.asdict(cfg.sampling),
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "world_size": info.world_size,
            "device": str(info.device),
            "precision": "bf16" if bf16 else "fp32",
            "compile": cfg.compile,
            "generate_seconds": round(gen_s, 3),
            "decode_seconds": round(dec_s, 3),
            "generate_images_per_s": round(n_images / max(gen_s, 1e-9), 3),
            "decode_images_per_s": round(n_images / max(dec_s, 1e-9), 3),
            "seconds": round(time.perf_counter() - t0, 3),
            "untrained_baseline": f"{UNTRAINED}: random-init(seed={cfg.seed})" if untrained is not None else None,
            **provenance,
        }
        write_results(results / "summary.json", summary, run_info, info.device)
        console.print(
            f"sample: wrote {out / 'samples.npz'} ({images.shape}); generation "
            f"{run_info['generate_images_per_s']:.3g} img/s, "
            f"decoding {run_info['decode_images_per_s']:.3g} img/s"
        )
    barrier()
    cleanup()


if __name__ == "__main__":
    main()
