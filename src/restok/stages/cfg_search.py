"""Stage `cfg_search`: FID as a function of the classifier-free guidance scale (docs/method.md, training-and-eval §5.3).

    python -m restok.stages.cfg_search --params params.yaml --generator data/train_generator/generator.pt \
        --tokenizer data/train_tokenizer/tokenizer.pt --reference data/reference_stats --results results/cfg_search

For every scale in cfg_search.scales, sample cfg_search.per_class images per class with sample.sampling (its
schedule, window, top-k/top-p, temperature; only cfg_scale changes) and compute the FID against the reference
statistics with params' fid.extractor. Every scale uses the same seeds (image i: sample.seed + i), so the curve
compares scales on common random numbers and reruns give the same numbers. Processes split the images as `sample`
does (RESTOK_NPROC_PER_NODE); rank 0 gathers the features and writes results/cfg_search/cfg_search.json
(scale -> FID, the best scale) and fid_vs_scale.png.

Relation to the paper's search (docs/method.md, training-and-eval §5.3): the official script runs a greedy 1-D hill-climb per schedule, from
1.75 (step, constant, linear) or 2.5 (rectangular), trying best +- 0.25 until both neighbours of the best were
evaluated, 50k samples per point (and for rectangular an outer grid over the window). Here the points are a fixed
grid taken from params, evaluated in full: the result is a pure function of params (DVC can cache and diff it), the
whole curve is plotted, and no point depends on noise in an earlier one. A grid with spacing 0.25 over the range
the hill-climb explores (e.g. 1.0 to 4.5 for the step schedule) contains every point the hill-climb can visit, so
its best point equals the hill-climb's result whenever FID is unimodal in the scale, and is never worse otherwise.
One schedule per run: sweep schedules or windows with `dvc exp run -S sample.sampling.cfg_schedule=...`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from restok.artifacts import load_models
from restok.config.evaluation import CfgSearch, Fid
from restok.config.load import stage_args
from restok.config.sample import Sample
from restok.fid import PROVENANCE_KEYS, build_extractor, load_stats
from restok.images import gather_to_main, rank_share, sample_images, sampling_bf16
from restok.io import save_png
from restok.launch import relaunch_if_requested
from restok.metrics import Features, InceptionExtractor, frechet_distance, statistics
from restok.provenance import write_results
from restok.sampling import compile_sampling
from restok.train.dist import barrier, cleanup, init_distributed
from restok.train.log import console, print0

# the params sections it reads (its dvc.yaml `params:`) and their types
PARAMS = {"profile": str, "sample": Sample, "fid": Fid, "cfg_search": CfgSearch}


def pool_features(extractor: InceptionExtractor, images, batch_size: int) -> torch.Tensor:
    """pool3 features (n, 2048) of uint8 (n, H, W, 3) images; (0, 2048) for none."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # (n, 3, H, W)
    if not len(x):
        return torch.zeros(0, 2048)
    return extractor.extract(x.split(batch_size)).pool


def plot(path: Path, fids: dict[float, float], best: float, title: str) -> None:
    """FID against scale, best marked; a pyplot-free Figure renders PNG with the Agg canvas (no display needed)."""
    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.subplots()
    scales = sorted(fids)
    ax.plot(scales, [fids[s] for s in scales], "o-")
    ax.plot([best], [fids[best]], "r*", markersize=14, label=f"best {best:g}")
    ax.set_xlabel("CFG scale")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=8)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None):
    relaunch_if_requested("restok.stages.cfg_search", argv)
    args, p = stage_args(
        __doc__,
        PARAMS,
        argv,
        generator="data/train_generator/generator.pt",
        tokenizer="data/train_tokenizer/tokenizer.pt",
        reference="data/reference_stats",
        results="results/cfg_search",
    )
    cfg, search = p.sample, p.cfg_search
    info = init_distributed(cfg.device)
    extractor = build_extractor(dataclasses.replace(p.fid, device=info.device.type))
    ref = load_stats(Path(args.reference) / "stats.npz", p.fid.extractor)
    ref_stats = {"mu": ref["mu"], "sigma": ref["sigma"], **{k: ref[k] for k in PROVENANCE_KEYS}}
    generator, tokenizer, provenance = load_models(args.generator, args.tokenizer, info.device)

    results = Path(args.results)
    if info.is_main:
        for stale in (results / "cfg_search.json", results / "provenance.json", results / "fid_vs_scale.png"):
            stale.unlink(missing_ok=True)
        results.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_images = generator.cfg.num_classes * search.per_class
    share = rank_share(n_images, cfg.batch_size, info.rank, info.world_size)
    bf16 = sampling_bf16(cfg.precision, info.device)
    if cfg.compile:
        compile_sampling(generator)
    fids = {}
    for scale in search.scales:
        sampling = dataclasses.replace(cfg.sampling, cfg_scale=scale)
        images, _ = sample_images(
            generator,
            tokenizer,
            sampling,
            share,
            search.per_class,
            cfg.seed,
            cfg.batch_size,
            info.device,
            bf16,
            desc=f"cfg {scale:g}",
        )
        parts = gather_to_main(pool_features(extractor, images, p.fid.batch_size), info)
        if info.is_main:
            feats = Features(pool=torch.cat(parts), logits=torch.zeros(0, 1008), provenance=extractor.provenance)
            fids[scale] = frechet_distance(statistics(feats), ref_stats)["fid"]
            print0(f"cfg_search: scale {scale:g} -> FID {fids[scale]:.4g} ({n_images} images)")
    if info.is_main:
        best = min(fids, key=fids.get)
        random_init = p.fid.extractor.endswith("random-init")
        out = {
            "fid": {f"{s:g}": v for s, v in fids.items()},
            "best_scale": best,
            "best_fid": fids[best],
            "num_images_per_scale": n_images,
            "per_class": search.per_class,
            "random_init_extractor": random_init,
        }
        run_info = {
            "profile": p.profile,
            "seed": cfg.seed,
            "precision": "bf16" if bf16 else "fp32",
            "compile": cfg.compile,
            "sampling": {k: v for k, v in dataclasses.asdict(cfg.sampling).items() if k != "cfg_scale"},
            "reference": ref["reference"],
            **extractor.provenance,
            "generator": provenance["generator"],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_results(results / "cfg_search.json", out, run_info, info.device)
        note = " (RANDOM-INIT Inception: not a real FID)" if random_init else ""
        plot(
            results / "fid_vs_scale.png",
            fids,
            best,
            f"{cfg.sampling.cfg_schedule} schedule, {n_images} images/scale, {extractor.provenance['extractor']}{note}",
        )
        console.print(f"cfg_search: best scale {best:g} (FID {fids[best]:.4g}){note}")
    barrier()
    cleanup()


if __name__ == "__main__":
    main()
