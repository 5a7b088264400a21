"""Stage `score`: gFID, IS, precision/recall of the samples, rFID and PSNR of the tokenizer, and the run's headline
numbers (spec training-and-eval.md sections 5.1-5.2; notes/ecosystem.md section 5).

    python -m restok.stages.score --params params.yaml --samples data/sample --reference data/reference_stats \
        --tokenizer data/train_tokenizer/tokenizer.pt --shards data/shard --results results

- gFID: Inception pool3 statistics of samples.npz against the reference statistics; IS from the 1008-way unbiased
  logits (10 splits, fewer when there are fewer than 10 images); precision/recall on pool3 with k = 3 against the
  reference features, as the ADM evaluator. The reference must come from params' fid.extractor (refused otherwise).
- rFID: every val image through the EMA tokenizer (eval, fp32, all tokens), reconstruction clamped to [0, 1] and
  rounded to the 8-bit grid, FID against the val statistics of reference_stats (the same val images); PSNR is the
  mean over images of -10 log10 MSE; codebook usage and entropy over the val codes.
Writes results/score/metrics.json, results/metrics.json (headline numbers of the whole run, collected from the
upstream stages' results read key by key, missing ones left null) and results/README.md (table + sample grid).
Every number names the extractor and weights that produced it; random-init weights are flagged loudly.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from restok.config import load_params
from restok.data.shards import read_manifest, write_json_atomic
from restok.metrics import (Features, codebook_stats, frechet_distance, inception_score, precision_recall, psnr,
                            statistics)
from restok.stages.reference_stats import (PROVENANCE_KEYS, batches, build_extractor, extract, fid_device,
                                           load_stats, val_images)
from restok.stages.sample import load_tokenizer
from restok.train.log import console, progress

PARAMS = ("profile", "fid")
PR_NEIGHBOURS = 3


@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, H, W) -> (reconstruction uint8 (B, 3, H, W), PSNR (B,), codes (B, L)); spec 5.1 post-process."""
    device = next(tokenizer.parameters()).device
    x = images.to(device).float() / 255  # (B, 3, H, W)
    codes = tokenizer.encode(x)  # (B, L)
    recon = (tokenizer.decode(codes).clamp(0, 1) * 255).round()  # 8-bit grid
    return recon.to(torch.uint8).cpu(), psnr(recon / 255, x).cpu(), codes.cpu()


def score_tokenizer(tokenizer, extractor, shard_dir: Path, batch_size: int, ref: dict) -> dict:
    count, images = val_images(shard_dir)
    pools, logits, psnrs, codes = [], [], [], []
    with progress(count, "reconstruct val") as bar:
        for batch in batches(images, batch_size):
            recon, batch_psnr, batch_codes = reconstruct(tokenizer, batch)
            feats = extractor.extract([recon])
            pools.append(feats.pool)
            logits.append(feats.logits)
            psnrs.append(batch_psnr)
            codes.append(batch_codes)
            bar.advance(len(batch))
    feats = Features(pool=torch.cat(pools), logits=torch.cat(logits), provenance=dict(extractor.provenance))
    val_ref = {"mu": ref["val_mu"], "sigma": ref["val_sigma"], **{k: ref[k] for k in PROVENANCE_KEYS}}
    rfid = frechet_distance(statistics(feats), val_ref)
    usage = codebook_stats(torch.cat(codes), tokenizer.cfg.level_sizes, tokenizer.cfg.codebook_size)
    return {"rfid": {**rfid, "num_images": len(feats.pool), "reference": "val (originals)", "tokens": "all"},
            "psnr": {"mean_db": float(torch.cat(psnrs).mean()), "num_images": len(feats.pool)},
            "codebook": {"usage": usage["all"]["usage"], "entropy_bits": usage["all"]["entropy_bits"],
                         "per_level": {k: v for k, v in usage.items() if k != "all"}}}


def score_samples(samples_npz: Path, extractor, batch_size: int, ref: dict) -> dict:
    with np.load(samples_npz) as npz:
        images = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    feats = extract(extractor, iter(images), len(images), batch_size, "inception samples")
    ref_stats = {"mu": ref["mu"], "sigma": ref["sigma"], **{k: ref[k] for k in PROVENANCE_KEYS}}
    ref_feats = Features(pool=torch.from_numpy(ref["features"]), logits=torch.zeros(0, 1008),
                         provenance={k: ref[k] for k in PROVENANCE_KEYS})
    gfid = frechet_distance(statistics(feats), ref_stats)
    return {"gfid": {**gfid, "num_samples": len(images), "reference": ref["reference"],
                     "reference_count": int(ref["count"])},
            "inception_score": {**inception_score(feats, splits=min(10, len(images))), "splits": min(10, len(images))},
            "precision_recall": {**precision_recall(ref_feats, feats, k=PR_NEIGHBOURS),
                                 "reference_images": len(ref_feats.pool)}}


# -------------------------------------------------------------------------------------------- headline
def read_json(path: Path) -> dict:
    """An upstream stage's JSON, or {} when it is missing or unreadable (the headline leaves those numbers null)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def pick(d: dict, *paths: str):
    """The value of the first dotted key path present in d (e.g. "time.seconds"), else None."""
    for path in paths:
        node = d
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def headline(p, scores: dict, tok_provenance: dict, args) -> dict:
    tok = read_json(Path(args.tokenizer_metrics))
    gen = read_json(Path(args.generator_metrics))
    smp = read_json(Path(args.sample_summary))
    teacher = pick(tok_provenance, "teacher") or pick(tok, "teacher") or {}
    teacher = teacher if isinstance(teacher, dict) else {"model": teacher}
    out = {
        "profile": p.profile,
        "rFID": scores["rfid"]["fid"], "gFID": scores["gfid"]["fid"],
        "IS": scores["inception_score"]["inception_score_mean"],
        "precision": scores["precision_recall"]["precision"], "recall": scores["precision_recall"]["recall"],
        "PSNR_dB": scores["psnr"]["mean_db"], "codebook_usage": scores["codebook"]["usage"],
        "PSNR_class_mean_dB": pick(tok, "class_mean_image_psnr"),
        "PSNR_global_mean_dB": pick(tok, "global_mean_image_psnr"),
        "PSNR_above_class_mean_dB": pick(tok, "psnr_above_class_mean_db"),
        "codebook_entropy_bits": scores["codebook"]["entropy_bits"],
        "num_samples": scores["gfid"]["num_samples"], "fid_reference": scores["gfid"]["reference"],
        "sampling_steps": pick(smp, "sampling_steps"),
        "generate_images_per_s": pick(smp, "generate_images_per_s"),
        "decode_images_per_s": pick(smp, "decode_images_per_s"),
        "cfg": pick(smp, "cfg"),
        "train_tokenizer_seconds": pick(tok, "seconds", "train_seconds", "wall_seconds", "time.seconds"),
        "train_generator_seconds": pick(gen, "seconds", "train_seconds", "wall_seconds", "time.seconds"),
        "extractor": scores["gfid"]["extractor"], "extractor_weights": scores["gfid"]["extractor_weights"],
        "teacher": pick(teacher, "model", "name"), "teacher_weights": pick(teacher, "weights", "source"),
        "tokenizer_weights": pick(tok, "weights") or "trained by this pipeline",
        "generator_weights": pick(gen, "weights") or "trained by this pipeline",
    }
    out["random_init"] = [name for name, weights in (("extractor", out["extractor"]),
                                                     ("teacher", out["teacher_weights"]))
                          if weights and "random-init" in str(weights)]
    return out


README_ROWS = (("rFID", "rFID", "tokenizer, val originals vs reconstructions"),
               ("gFID", "gFID", "samples vs reference"), ("IS", "Inception Score", "samples"),
               ("precision", "precision (k=3)", "samples vs reference"),
               ("recall", "recall (k=3)", "samples vs reference"),
               ("PSNR_dB", "PSNR (dB)", "tokenizer, val"),
               ("PSNR_above_class_mean_dB", "PSNR above the class-mean image (dB)",
                "tokenizer, val (train_tokenizer's eval images)"),
               ("codebook_usage", "codebook usage", "tokenizer, val codes"),
               ("codebook_entropy_bits", "codebook entropy (bits)", "tokenizer, val codes"),
               ("sampling_steps", "sampling steps", "generator"),
               ("generate_images_per_s", "generation (images/s)", "sample"),
               ("decode_images_per_s", "decoding (images/s)", "sample"),
               ("train_tokenizer_seconds", "train_tokenizer (s)", "wall time"),
               ("train_generator_seconds", "train_generator (s)", "wall time"))


def readme(head: dict, results: Path) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [f"# Results (profile `{head['profile']}`)", "",
             "Generated by `python -m restok.stages.score`; do not edit. Numbers: `metrics.json`.", ""]
    if head["random_init"]:
        lines += [f"> **WARNING: NOT REAL METRICS.** The {' and '.join(head['random_init'])} ran with RANDOM-INIT "
                  "weights (offline demo). These numbers only rank runs of this pipeline against each other; they "
                  "are not an FID/IS/precision/recall and can never be compared with a paper's numbers.", ""]
    metric_note = f"Inception metrics by `{head['extractor']}` ({head['extractor_weights']})"
    lines += ["| metric | value | measured on |", "| --- | --- | --- |"]
    lines += [f"| {label} | {fmt(head[key])} | {where} |" for key, label, where in README_ROWS]
    lines += ["", f"- {metric_note}; FID reference: {head['fid_reference']}, {head['num_samples']} samples.",
              f"- Tokenizer weights: {head['tokenizer_weights']}; generator weights: {head['generator_weights']}.",
              f"- Teacher: `{head['teacher']}` ({head['teacher_weights']}).", f"- Sampling: {head['cfg']}.", ""]
    if (results / "sample" / "grid.png").is_file():
        lines += ["## Samples (one row per class)", "", "![samples, one row per class](sample/grid.png)", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--samples", default="data/sample")
    ap.add_argument("--reference", default="data/reference_stats")
    ap.add_argument("--tokenizer", default="data/train_tokenizer/tokenizer.pt")
    ap.add_argument("--shards", default="data/shard")
    ap.add_argument("--results", default="results")
    ap.add_argument("--tokenizer-metrics", default="results/train_tokenizer/metrics.json")
    ap.add_argument("--generator-metrics", default="results/train_generator/metrics.json")
    ap.add_argument("--sample-summary", default="results/sample/summary.json")
    args = ap.parse_args(argv)
    p = load_params(args.params, PARAMS)
    extractor = build_extractor(p.fid)
    ref = load_stats(Path(args.reference) / "stats.npz", p.fid.extractor)
    samples = Path(args.samples) / "samples.npz"
    if not samples.is_file():
        raise FileNotFoundError(f"{samples} does not exist; run the sample stage first")
    read_manifest(args.shards, "val")
    tokenizer, tok_provenance = load_tokenizer(args.tokenizer, fid_device(p.fid.device))

    results = Path(args.results)
    for stale in (results / "score" / "metrics.json", results / "metrics.json", results / "README.md"):
        stale.unlink(missing_ok=True)
    (results / "score").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scores = {**score_samples(samples, extractor, p.fid.batch_size, ref),
              **score_tokenizer(tokenizer, extractor, Path(args.shards), p.fid.batch_size, ref)}
    scores = {"profile": p.profile, **scores, "tokenizer": tok_provenance,
              "random_init_extractor": p.fid.extractor.endswith("random-init"),
              "seconds": round(time.perf_counter() - t0, 3)}
    head = headline(p, scores, tok_provenance, args)
    write_json_atomic(results / "score" / "metrics.json", scores)
    write_json_atomic(results / "metrics.json", head)
    tmp = results / "README.md.tmp"
    tmp.write_text(readme(head, results))
    tmp.replace(results / "README.md")
    console.print(f"score: gFID {head['gFID']:.4g}, IS {head['IS']:.4g}, precision {head['precision']:.3g}, "
                  f"recall {head['recall']:.3g}, rFID {head['rFID']:.4g}, PSNR {head['PSNR_dB']:.3g} dB "
                  f"({head['extractor']}{', RANDOM-INIT: not real metrics' if head['random_init'] else ''})")


if __name__ == "__main__":
    main()
