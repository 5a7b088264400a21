"""Stage `score`: gFID, IS, precision/recall of the samples, rFID and PSNR of the tokenizer, and the run's headline
numbers (docs/method.md, training-and-eval §5.1-5.2; docs/tooling.md, ecosystem §5).

    python -m restok.stages.score --params params.yaml --samples data/sample --reference data/reference_stats \
        --tokenizer data/train_tokenizer/tokenizer.pt --shards data/shard --results results

- gFID: Inception pool3 statistics of samples.npz against the reference statistics; IS from the 1008-way unbiased
  logits (10 splits, fewer when there are fewer than 10 images; null with `IS_note` when the extractor has no
  classifier); precision/recall on pool3 with k = 3 against the reference features, as the ADM evaluator. The
  reference must come from params' fid.extractor (refused otherwise).
- class probe (restok.probe): logistic regression on the Inception pool3 features of the first
  fid.probe_per_class train images of each class; its accuracy on as many val images per class beside its accuracy
  on the samples (their conditioning labels), overall and per class, flagged unreliable when it cannot classify real
  val images (0 turns it off). The real images' features come from reference_stats, which extracts them once.
- rFID: every val image through the EMA tokenizer (eval, fp32, all tokens), reconstruction clamped to [0, 1] and
  rounded to the 8-bit grid, FID against the val statistics of reference_stats (the same val images); PSNR is the
  mean over images of -10 log10 MSE; codebook usage and entropy over the val codes.
- gFID and rFID paired: both again on the same number of images (the smaller of the two counts, class-balanced),
  which the check "generator close to its tokenizer" compares: on a user's data the val split rarely holds exactly
  sample.per_class x classes images.
- gFID of an untrained generator: the same images from a freshly initialised generator of the same config
  (data/sample/untrained.npz, sample.untrained_baseline), same extractor and reference: what training has to beat.
Writes results/score/metrics.json, results/metrics.json (headline numbers of the whole run, collected from the
upstream stages' results read key by key, missing ones left null, and `checks`: the profile's targets, params
`checks`, held against them by restok.checks) and results/README.md (the checks first, then the table and the
sample grid). The README names the machine (CPU model, torch's CPU capability, native bf16, threads) and says so
when it differs from the machine of the committed run (results/provenance.json at git HEAD): bits are reproducible
only on one machine type.
Every number names the extractor and weights that produced it; random-init weights are flagged loudly.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from restok import checks
from restok.artifacts import load_tokenizer
from restok.config.evaluation import Checks, Fid
from restok.config.load import stage_args
from restok.data.shards import read_manifest
from restok.fid import PROVENANCE_KEYS, batches, build_extractor, extract, fid_device, load_stats, val_images
from restok.metrics import (
    Features,
    codebook_stats,
    frechet_distance,
    inception_score,
    precision_recall,
    psnr,
    statistics,
)
from restok.images import UNTRAINED
from restok.probe import class_probe_report, fit_probe
from restok.provenance import (
    committed_environment,
    environment,
    machine_differences,
    read_results,
    split_numbers,
    write_results,
)
from restok.train.log import console, progress

# the params sections it reads (its dvc.yaml `params:`) and their types
PARAMS = {"profile": str, "fid": Fid, "checks": Checks}
PR_NEIGHBOURS = 3
# headline entries that are not quality numbers (speed, the sampling config): in results/provenance.json, shown in
# the README, not DVC metrics
NOT_METRICS = (
    "generate_images_per_s",
    "decode_images_per_s",
    "train_tokenizer_seconds",
    "train_generator_seconds",
    "cfg",
)


@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, H, W) -> (reconstruction uint8 (B, 3, H, W), PSNR (B,), codes (B, L)); docs/method.md, training-and-eval §5.1 post-process."""
    device = next(tokenizer.parameters()).device
    x = images.to(device).float() / 255  # (B, 3, H, W)
    codes = tokenizer.encode(x)  # (B, L)
    recon = (tokenizer.decode(codes).clamp(0, 1) * 255).round()  # 8-bit grid
    return recon.to(torch.uint8).cpu(), psnr(recon / 255, x).cpu(), codes.cpu()


def score_tokenizer(tokenizer, extractor, shard_dir: Path, batch_size: int, ref: dict) -> tuple[dict, Features, list]:
    """The tokenizer's metrics, and its reconstructions' Inception features with the val labels (for the probe)."""
    labels = []
    count, images = val_images(shard_dir, labels)
    pools, psnrs, codes = [], [], []
    with progress(count, "reconstruct val") as bar:
        for batch in batches(images, batch_size):
            recon, batch_psnr, batch_codes = reconstruct(tokenizer, batch)
            pools.append(extractor.extract([recon]).pool)
            psnrs.append(batch_psnr)
            codes.append(batch_codes)
            bar.advance(len(batch))
    feats = Features(pool=torch.cat(pools), logits=None, provenance=dict(extractor.provenance))
    val_ref = {"mu": ref["val_mu"], "sigma": ref["val_sigma"], **{k: ref[k] for k in PROVENANCE_KEYS}}
    rfid = frechet_distance(statistics(feats), val_ref)
    usage = codebook_stats(torch.cat(codes), tokenizer.cfg.level_sizes, tokenizer.cfg.codebook_size)
    return (
        {
            "rfid": {**rfid, "num_images": len(feats.pool), "reference": "val (originals)", "tokens": "all"},
            "psnr": {"mean_db": float(torch.cat(psnrs).mean()), "num_images": len(feats.pool)},
            "codebook": {
                "usage": usage["all"]["usage"],
                "entropy_bits": usage["all"]["entropy_bits"],
                "per_level": {k: v for k, v in usage.items() if k != "all"},
            },
        },
        feats,
        labels,
    )


def load_samples(samples_npz: Path) -> torch.Tensor:
    with np.load(samples_npz) as npz:
        return torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8


def reference_stats(ref: dict) -> dict:
    return {"mu": ref["mu"], "sigma": ref["sigma"], **{k: ref[k] for k in PROVENANCE_KEYS}}


def score_samples(samples_npz: Path, extractor, batch_size: int, ref: dict) -> tuple[dict, Features, np.ndarray]:
    """The sample metrics, and the samples' Inception features with their conditioning labels (for the probe)."""
    images = load_samples(samples_npz)
    with np.load(samples_npz) as npz:
        labels = npz["arr_1"]
    feats = extract(extractor, iter(images), len(images), batch_size, "inception samples")
    ref_stats = reference_stats(ref)
    ref_feats = Features(
        pool=torch.from_numpy(ref["features"]),
        logits=torch.zeros(0, 1008),
        provenance={k: ref[k] for k in PROVENANCE_KEYS},
    )
    gfid = frechet_distance(statistics(feats), ref_stats)
    scores = {
        "gfid": {
            **gfid,
            "num_samples": len(images),
            "reference": ref["reference"],
            "reference_count": int(ref["count"]),
        },
        "inception_score": {**inception_score(feats, splits=min(10, len(images))), "splits": min(10, len(images))},
        "precision_recall": {
            **precision_recall(ref_feats, feats, k=PR_NEIGHBOURS),
            "reference_images": len(ref_feats.pool),
        },
    }
    return scores, feats, labels


def class_probe(
    ref: dict,
    per_class: int,
    name: str,
    samples: Features,
    sample_labels: np.ndarray,
    recon: Features,
    recon_labels: list,
) -> dict:
    """Fit the probe on the real train features that reference_stats kept and report it on val, on the samples
    and on the reconstructions (restok.probe)."""
    if "probe_per_class" not in ref or int(ref["probe_per_class"]) != per_class:
        raise ValueError(
            f"the reference statistics hold class-probe features for fid.probe_per_class="
            f"{ref.get('probe_per_class')}, params say {per_class}; rerun reference_stats"
        )
    if len(ref["probe_train_labels"]) == 0:
        return {
            "real_val_accuracy": None,
            "sample_accuracy": None,
            "per_class": {},
            "chance": None,
            "features": name,
            "reliable": False,
            "note": "not available: the train split is empty",
        }
    probe = fit_probe(ref["probe_train_features"], ref["probe_train_labels"], num_classes=int(ref["probe_num_classes"]))
    report = class_probe_report(
        probe,
        ref["probe_val_features"],
        ref["probe_val_labels"],
        samples.pool,
        sample_labels,
        name,
        recon.pool,
        recon_labels,
    )
    return {**report, "train_images": len(ref["probe_train_labels"]), "per_class_cap": per_class}


def balanced_order(labels) -> np.ndarray:
    """Indices that take the classes in turn: each class's first image (in class order), then each class's second,
    and so on. A prefix of it is as class-balanced as the labels allow."""
    labels = np.asarray(labels)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return np.lexsort((labels, rank))


def paired_fids(samples: Features, sample_labels, recons: Features, recon_labels, ref: dict) -> dict:
    """gFID and rFID on the same number of images n = min(samples, val images), each side a class-balanced prefix
    (`balanced_order`) where it holds more: FID falls with the count, so only equal counts compare. With equal
    counts (the default run) these are the headline gFID and rFID."""
    n = min(len(samples.pool), len(recons.pool))

    def first(feats: Features, labels) -> Features:
        if len(feats.pool) == n:
            return feats
        keep = torch.from_numpy(balanced_order(labels)[:n])
        return Features(pool=feats.pool[keep], logits=None, provenance=feats.provenance)

    val_ref = {"mu": ref["val_mu"], "sigma": ref["val_sigma"], **{k: ref[k] for k in PROVENANCE_KEYS}}
    return {
        "num_images": n,
        "gfid": frechet_distance(statistics(first(samples, sample_labels)), reference_stats(ref))["fid"],
        "rfid": frechet_distance(statistics(first(recons, recon_labels)), val_ref)["fid"],
    }


def score_untrained(samples_npz: Path, extractor, batch_size: int, ref: dict) -> dict:
    """gFID of the untrained generator's samples (sample.untrained_baseline) against the same reference."""
    images = load_samples(samples_npz)
    feats = extract(extractor, iter(images), len(images), batch_size, "inception untrained samples")
    return {
        **frechet_distance(statistics(feats), reference_stats(ref)),
        "num_samples": len(images),
        "reference": ref["reference"],
    }


# -------------------------------------------------------------------------------------------- headline
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
    tok = read_results(args.tokenizer_metrics)
    gen = read_results(args.generator_metrics)
    smp = read_results(args.sample_summary)
    codes = pick(read_results(args.latents_summary), "splits.val.per_position") or {}
    teacher = pick(tok_provenance, "teacher") or pick(tok, "teacher") or {}
    teacher = teacher if isinstance(teacher, dict) else {"model": teacher}
    out = {
        "profile": p.profile,
        "rFID": scores["rfid"]["fid"],
        "gFID": scores["gfid"]["fid"],
        "IS": scores["inception_score"]["inception_score_mean"],
        "IS_note": scores["inception_score"].get("note"),
        "precision": scores["precision_recall"]["precision"],
        "recall": scores["precision_recall"]["recall"],
        "PSNR_dB": scores["psnr"]["mean_db"],
        "codebook_usage": scores["codebook"]["usage"],
        "PSNR_class_mean_dB": pick(tok, "class_mean_image_psnr"),
        "PSNR_global_mean_dB": pick(tok, "global_mean_image_psnr"),
        "PSNR_above_class_mean_dB": pick(tok, "psnr_above_class_mean_db"),
        "codebook_entropy_bits": scores["codebook"]["entropy_bits"],
        "probe_val_accuracy": pick(scores, "class_probe.real_val_accuracy"),
        "probe_sample_accuracy": pick(scores, "class_probe.sample_accuracy"),
        "probe_recon_accuracy": pick(scores, "class_probe.recon_accuracy"),
        "probe_reliable": pick(scores, "class_probe.reliable"),
        "probe_note": pick(scores, "class_probe.note"),
        "num_samples": scores["gfid"]["num_samples"],
        "fid_reference": scores["gfid"]["reference"],
        "rFID_num_images": scores["rfid"]["num_images"],
        "gFID_paired": pick(scores, "paired.gfid"),
        "rFID_paired": pick(scores, "paired.rfid"),
        "paired_num_images": pick(scores, "paired.num_images"),
        "gFID_untrained_generator": pick(scores, "gfid_untrained_generator.fid"),
        "code_position_entropy_bits": codes.get("position_entropy_bits"),
        "code_conditional_entropy_bits": codes.get("conditional_entropy_bits"),
        "sampling_steps": pick(smp, "sampling_steps"),
        "generate_images_per_s": pick(smp, "generate_images_per_s"),
        "decode_images_per_s": pick(smp, "decode_images_per_s"),
        "cfg": pick(smp, "cfg"),
        "train_tokenizer_seconds": pick(tok, "seconds", "train_seconds", "wall_seconds", "time.seconds"),
        "train_generator_seconds": pick(gen, "seconds", "train_seconds", "wall_seconds", "time.seconds"),
        "extractor": scores["gfid"]["extractor"],
        "extractor_weights": scores["gfid"]["extractor_weights"],
        "extractor_weights_sha256": scores["gfid"].get("extractor_weights_sha256"),
        "teacher": pick(teacher, "model", "name"),
        "teacher_weights": pick(teacher, "weights", "source"),
        "teacher_weights_sha256": pick(teacher, "sha256"),
        "teacher_substitute_for": pick(teacher, "substitute_for"),
        "lpips": pick(tok, "losses.lpips"),
        "tokenizer_weights": pick(tok, "weights") or "trained by this pipeline",
        "generator_weights": pick(gen, "weights") or "trained by this pipeline",
    }
    out["random_init"] = [
        name
        for name, weights in (
            ("extractor", out["extractor"]),
            ("teacher", out["teacher_weights"]),
            ("LPIPS", out["lpips"]),
        )
        if weights and "random-init" in str(weights)
    ]
    return out


README_ROWS = (
    ("rFID", "rFID", "tokenizer, val originals vs reconstructions"),
    ("gFID", "gFID", "samples vs reference"),
    ("IS", "Inception Score", "samples"),
    ("precision", "precision (k=3)", "samples vs reference"),
    ("recall", "recall (k=3)", "samples vs reference"),
    ("probe_val_accuracy", "class probe accuracy, real val", "Inception pool3 linear probe"),
    ("probe_sample_accuracy", "class probe accuracy, samples", "same probe, conditioning labels"),
    (
        "probe_recon_accuracy",
        "class probe accuracy, reconstructions",
        "same probe, tokenizer's val reconstructions (what samples through this decoder can reach)",
    ),
    ("PSNR_dB", "PSNR (dB)", "tokenizer, val"),
    (
        "PSNR_above_class_mean_dB",
        "PSNR above the class-mean image (dB)",
        "tokenizer, val (train_tokenizer's eval images)",
    ),
    ("codebook_usage", "codebook usage", "tokenizer, val codes"),
    ("codebook_entropy_bits", "codebook entropy (bits)", "tokenizer, val codes"),
    ("sampling_steps", "sampling steps", "generator"),
    ("generate_images_per_s", "generation (images/s)", "sample"),
    ("decode_images_per_s", "decoding (images/s)", "sample"),
    ("train_tokenizer_seconds", "train_tokenizer (s)", "wall time"),
    ("train_generator_seconds", "train_generator (s)", "wall time"),
)


def machine_lines(env: dict, committed: dict | None) -> tuple[list[str], list[str]]:
    """(warning, bullet) lines of the README about the machine of this run (`env`, provenance.environment) against
    that of the committed run (`committed`; None: there is none)."""
    cpu = env.get("cpu") or {}
    here = (
        f"{cpu.get('model')} (torch CPU capability {cpu.get('capability')}, native bf16 "
        f"{'yes' if cpu.get('native_bf16') else 'no'}, {env.get('torch_threads')} threads"
        + (f", GPU {env.get('device_name')}" if env.get("cuda") else "")
        + ")"
    )
    if committed is None:
        return [], [f"- Machine: {here}; no committed run (results/provenance.json at git HEAD) to compare with."]
    differ = machine_differences(env, committed)
    if not differ:
        return [], [f"- Machine: {here}, as the committed run's."]
    warning = [
        f"> **This run's machine differs from the committed run's** ({'; '.join(differ)}). Bits are "
        "reproducible only on one machine type: other CPUs dispatch to other kernels, and the same code, seeds "
        'and lock have given other numbers (the README\'s "Reproducibility and reliability" gives the '
        "measured spread). Compare these numbers with the committed ones within that spread.",
        "",
    ]
    return warning, [f"- Machine: {here}; differs from the committed run's."]


def readme(head: dict, results: Path, machine: tuple[list[str], list[str]] = ([], [])) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [
        f"# Results (profile `{head['profile']}`)",
        "",
        "Generated by `python -m restok.stages.score`; do not edit. Numbers: `metrics.json`.",
        "",
        *checks.markdown(head["checks"]),
        *machine[0],
    ]
    if head["random_init"]:
        lines += [
            f"> **WARNING: NOT REAL METRICS.** The {' and '.join(head['random_init'])} ran with RANDOM-INIT "
            "weights (offline demo). These numbers only rank runs of this pipeline against each other; they "
            "are not an FID/IS/precision/recall and can never be compared with a paper's numbers.",
            "",
        ]
    metric_note = f"Inception metrics by `{head['extractor']}` ({head['extractor_weights']})"
    lines += ["| metric | value | measured on |", "| --- | --- | --- |"]
    lines += [f"| {label} | {fmt(head[key])} | {where} |" for key, label, where in README_ROWS]
    substitute = f"; a substitute for `{head['teacher_substitute_for']}`" if head.get("teacher_substitute_for") else ""
    lines += [
        "",
        f"- {metric_note}, sha256 `{head['extractor_weights_sha256']}`; FID reference: "
        f"{head['fid_reference']}, {head['num_samples']} samples.",
        *([f"- Inception Score: {head['IS_note']}."] if head.get("IS_note") else []),
        *([f"- Class probe: {head['probe_note']}."] if head.get("probe_note") else []),
        f"- Tokenizer weights: {head['tokenizer_weights']}; generator weights: {head['generator_weights']}.",
        f"- Teacher: `{head['teacher']}` ({head['teacher_weights']}, sha256 `{head['teacher_weights_sha256']}`"
        f"{substitute}).",
        f"- LPIPS: {head['lpips']}.",
        f"- Sampling: {head['cfg']}.",
        *machine[1],
        "",
    ]
    if (results / "sample" / "grid.png").is_file():
        lines += ["## Samples (one row per class)", "", "![samples, one row per class](sample/grid.png)", ""]
    return "\n".join(lines)


def main(argv=None):
    args, p = stage_args(
        __doc__,
        PARAMS,
        argv,
        helps={"latents_summary": "per-position code entropy of the val codes (extract_latents)"},
        samples="data/sample",
        reference="data/reference_stats",
        tokenizer="data/train_tokenizer/tokenizer.pt",
        shards="data/shard",
        results="results",
        tokenizer_metrics="results/train_tokenizer/metrics.json",
        generator_metrics="results/train_generator/metrics.json",
        sample_summary="results/sample/summary.json",
        latents_summary="results/extract_latents/summary.json",
    )
    extractor = build_extractor(p.fid)
    ref = load_stats(Path(args.reference) / "stats.npz", p.fid.extractor)
    samples = Path(args.samples) / "samples.npz"
    if not samples.is_file():
        raise FileNotFoundError(f"{samples} does not exist; run the sample stage first")
    read_manifest(args.shards, "val")
    tokenizer, tok_provenance = load_tokenizer(args.tokenizer, fid_device(p.fid.device))

    results = Path(args.results)
    for stale in (
        results / "score" / "metrics.json",
        results / "metrics.json",
        results / "README.md",
        results / "score" / "provenance.json",
        results / "provenance.json",
    ):
        stale.unlink(missing_ok=True)
    (results / "score").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sample_scores, sample_feats, sample_labels = score_samples(samples, extractor, p.fid.batch_size, ref)
    tok_scores, recon_feats, recon_labels = score_tokenizer(
        tokenizer, extractor, Path(args.shards), p.fid.batch_size, ref
    )
    scores = {
        **sample_scores,
        **tok_scores,
        "paired": paired_fids(sample_feats, sample_labels, recon_feats, recon_labels, ref),
    }
    if p.fid.probe_per_class:
        scores["class_probe"] = class_probe(
            ref,
            p.fid.probe_per_class,
            extractor.provenance["extractor"],
            sample_feats,
            sample_labels,
            recon_feats,
            recon_labels,
        )
    untrained = Path(args.samples) / UNTRAINED
    scores["gfid_untrained_generator"] = (
        score_untrained(untrained, extractor, p.fid.batch_size, ref) if untrained.is_file() else None
    )
    scores = {**scores, "random_init_extractor": p.fid.extractor.endswith("random-init")}
    head = headline(p, scores, tok_provenance, args)
    head["checks"] = checks.evaluate(p.checks, head)
    score_metrics, score_info = split_numbers(scores)
    write_results(
        results / "score" / "metrics.json",
        score_metrics,
        {
            "profile": p.profile,
            **score_info,
            "tokenizer": tok_provenance,
            "seconds": round(time.perf_counter() - t0, 3),
        },
        extractor.device,
    )
    check_metrics, check_info = checks.split(head["checks"])
    head_metrics, head_info = split_numbers({k: v for k, v in head.items() if k not in (*NOT_METRICS, "checks")})
    write_results(
        results / "metrics.json",
        {"checks": check_metrics, **head_metrics},
        {"checks": check_info, **head_info, **{k: head[k] for k in NOT_METRICS}},
        extractor.device,
    )
    tmp = results / "README.md.tmp"
    tmp.write_text(readme(head, results, machine_lines(environment(extractor.device), committed_environment(results))))
    tmp.replace(results / "README.md")
    is_text = "n/a" if head["IS"] is None else f"{head['IS']:.4g}"
    console.print(
        f"score: gFID {head['gFID']:.4g}, IS {is_text}, probe accuracy real val "
        f"{head['probe_val_accuracy']} / samples {head['probe_sample_accuracy']}, precision "
        f"{head['precision']:.3g}, "
        f"recall {head['recall']:.3g}, rFID {head['rFID']:.4g}, PSNR {head['PSNR_dB']:.3g} dB "
        f"({head['extractor']}{', RANDOM-INIT: not real metrics' if head['random_init'] else ''}); "
        f"{sum(c['pass'] for c in head['checks'])} of {len(head['checks'])} checks pass"
    )


if __name__ == "__main__":
    main()
