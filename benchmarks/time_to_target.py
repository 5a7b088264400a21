"""Tokenizer speedrun: wall-clock seconds to the reconstruction target, recipe against recipe, in one run.

    python benchmarks/time_to_target.py                              # old vs new default, 450 s each
    python benchmarks/time_to_target.py --recipe new --recipe 'lr3e-3:train_tokenizer.optim.lr=3e-3' --budget 240
    python benchmarks/time_to_target.py --seeds 0 1 2 --recipe new --json out.json

Each recipe is a params tree (the default profile with a few keys set) whose tokenizer is trained by the
`train_tokenizer` stage's own setup and loop (`restok.stages.train_tokenizer.setup` / `train`) on the pipeline's
shards and cached teacher features (`dvc repro cache_features` first). The training clock stops while the EMA is
evaluated, every `--every` seconds of training, exactly as the stage evaluates it at the end (val PSNR on
`eval_images` val images, against the per-class mean image of the train split). A recipe runs until its last step
or the budget, whichever comes first. Printed per recipe: EMA val PSNR at the marks, and the seconds of training to
reach class-mean + `checks.psnr_above_class_mean_db` (or `--target-db`), interpolated between evaluations ("not
reached" otherwise); then each recipe's time against the first one's. Wall clock, not steps: a recipe whose steps
are slower can still win. Run it on an idle machine: on 2 cores, anything beside it moves the times.

Recipes: `new` = params.yaml as it is; `old` = the tokenizer recipe before the speedrun (OLD below); or
`name:key=value,key=value` (dotted params keys, YAML values) applied to params.yaml.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

import restok.stages  # noqa: F401  (torch threads from the job's CPUs, as in every stage)
from restok.config.engine import cli_value, read_yaml, set_dotted
from restok.config.load import load_params
from restok.stages import train_tokenizer as stage

# The tokenizer and its training before the speedrun (the default profile until then), as overrides.
OLD = {
    "tokenizer.pixel_channels": [32, 32, 64],
    "tokenizer.enc_width": 128,
    "tokenizer.enc_depth": 4,
    "tokenizer.enc_heads": 4,
    "tokenizer.dec_width": 128,
    "tokenizer.dec_depth": 4,
    "tokenizer.dec_heads": 4,
    "tokenizer.vf_dec_fraction": 1.0,
    "train_tokenizer.loop.max_steps": 750,
    "train_tokenizer.loop.batch_size": 32,
    "train_tokenizer.loop.ema_decay": 0.99,
    "train_tokenizer.optim.lr": 2.0e-3,
    "train_tokenizer.optim.end_lr": 2.0e-4,
    "train_tokenizer.optim.warmup_steps": 50,
    "train_tokenizer.optim.schedule": "cosine",
    "train_tokenizer.optim.algorithm": "adamw",
}


def parse_recipe(text: str) -> tuple[str, dict]:
    if text == "new":
        return "new", {}
    if text == "old":
        return "old", dict(OLD)
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", body)):  # commas inside [...] belong to a list value
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"recipe {text!r}: {item!r} is not key=value")
        overrides[key.strip()] = cli_value(value)
    return name, overrides


def apply(tree: dict, overrides: dict) -> dict:
    for dotted, value in overrides.items():
        set_dotted(tree, dotted, value, "recipe key ")
    return tree


def run_recipe(name: str, overrides: dict, seed: int, args, work: Path) -> dict:
    tree = apply(read_yaml(args.params), {**overrides, "train_tokenizer.loop.seed": seed})
    folder = work / f"{name}-s{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    params_path = folder / "params.yaml"
    params_path.write_text(yaml.safe_dump(tree, sort_keys=False))
    p = load_params(params_path, stage.PARAMS)
    tt = p.train_tokenizer
    ns = argparse.Namespace(
        params=str(params_path),
        shards=args.shards,
        features=args.features,
        out=str(folder / "out"),
        results=str(folder / "results"),
    )
    run = stage.setup(p, ns)
    target_db = args.target_db if args.target_db is not None else tree["checks"]["psnr_above_class_mean_db"]
    evals, reached = [], None
    while True:
        stage.train(run, deadline=time.time() + args.every)
        seconds = run.seconds_this_run
        metrics, _, _ = stage.evaluate(
            run.ema.model, args.shards, tt.eval_images, run.device, run.local_bs, tt.baseline_train_images
        )
        above = metrics["psnr_above_class_mean_db"]
        evals.append(
            {
                "seconds": round(seconds, 1),
                "step": run.step,
                "psnr": round(metrics["psnr"], 3),
                "above_class_mean_db": round(above, 3),
            }
        )
        print(
            f"{name} seed {seed}: {seconds:7.1f} s step {run.step:5d}  EMA val PSNR {metrics['psnr']:.2f} dB "
            f"({above:+.2f} over the class mean)",
            file=sys.stderr,
            flush=True,
        )
        if reached is None and above >= target_db:
            prev = evals[-2] if len(evals) > 1 else {"seconds": 0.0, "above_class_mean_db": -1e9}
            frac = (target_db - prev["above_class_mean_db"]) / (above - prev["above_class_mean_db"])
            reached = round(prev["seconds"] + max(0.0, min(1.0, frac)) * (seconds - prev["seconds"]), 1)
        if run.step >= tt.loop.max_steps or seconds >= args.budget or (reached is not None and args.stop_at_target):
            break
    if run.curve is not None:
        run.curve.close()
    return {
        "recipe": name,
        "seed": seed,
        "overrides": overrides,
        "evals": evals,
        "target_above_class_mean_db": target_db,
        "seconds_to_target": reached,
        "steps": run.step,
        "max_steps": tt.loop.max_steps,
        "steps_per_second": round(run.step / max(run.seconds_this_run, 1e-9), 3),
        "class_mean_image_psnr": metrics["class_mean_image_psnr"],
    }


def at_mark(evals: list[dict], mark: float) -> float | None:
    """PSNR of the last evaluation at `mark` seconds (up to 5% after it) or before (None if none)."""
    before = [e for e in evals if e["seconds"] <= mark * 1.05]  # an evaluation ends the step that passes it
    return before[-1]["psnr"] if before else None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", help="old, new or name:key=value,... (repeatable; default old new)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--budget", type=float, default=450.0, help="training seconds per recipe at most")
    ap.add_argument("--every", type=float, default=30.0, help="training seconds between evaluations")
    ap.add_argument("--marks", type=float, nargs="+", default=[60, 120, 240, 450])
    ap.add_argument(
        "--target-db",
        type=float,
        help="the target, in dB above the class-mean image (default: params checks.psnr_above_class_mean_db); a "
        "lower one times recipes that do not reach the check's within the budget",
    )
    ap.add_argument("--stop-at-target", action="store_true", help="end a recipe once it reaches the target")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shard")
    ap.add_argument("--features", default="data/cache_features")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    recipes = [parse_recipe(r) for r in (args.recipe or ["old", "new"])]
    rows = []
    with tempfile.TemporaryDirectory(prefix="time_to_target.") as work:
        for seed in args.seeds:  # recipes interleaved per seed: A/B, A/B, so drifts in machine speed hit both
            for name, overrides in recipes:
                rows.append(run_recipe(name, overrides, seed, args, Path(work)))
    first = recipes[0][0]
    print(
        f"{'recipe':<24} {'seed':>4} "
        + " ".join(f"{f'{m:g} s':>8}" for m in args.marks)
        + f" {'to target':>10} {'steps/s':>8}"
    )
    for row in rows:
        marks = [at_mark(row["evals"], m) for m in args.marks]
        target = f"{row['seconds_to_target']:.0f} s" if row["seconds_to_target"] is not None else "not reached"
        print(
            f"{row['recipe']:<24} {row['seed']:>4} "
            + " ".join(f"{m:8.2f}" if m is not None else f"{'-':>8}" for m in marks)
            + f" {target:>10} {row['steps_per_second']:8.2f}"
        )
    for name, _ in recipes[1:]:
        for seed in args.seeds:
            a = next(r for r in rows if r["recipe"] == first and r["seed"] == seed)
            b = next(r for r in rows if r["recipe"] == name and r["seed"] == seed)
            if b["seconds_to_target"] is None:
                ratio = "not comparable (not reached)"
            elif a["seconds_to_target"] is None:
                ratio = (
                    f"> {a['evals'][-1]['seconds'] / b['seconds_to_target']:.2f}x ({first} did not reach it in "
                    f"{a['evals'][-1]['seconds']:.0f} s)"
                )
            else:
                ratio = f"{a['seconds_to_target'] / b['seconds_to_target']:.2f}x"
            print(f"seed {seed}: {name} reaches the target {ratio} faster than {first}")
    if args.json:
        Path(args.json).write_text(json.dumps({"marks": args.marks, "budget": args.budget, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
