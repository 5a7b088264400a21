"""Two training jobs side by side on one machine, against one alone: does each keep to the CPUs it requested?

    python benchmarks/cpu_budget.py                      # all CPUs of this machine; batch 8, 5 timed steps
    python benchmarks/cpu_budget.py --batch 16 --steps 10

The workload is the tokenizer training step of benchmarks/tokenizer.py (the default profile's tokenizer at 64 px,
L2 + VQ loss, AdamW, EMA), the step train_tokenizer runs. Each job is a fresh process that imports `restok.stages`
first, as every stage does, so restok.cpus sets its torch threads. Three runs, each reporting training images/s:

- alone: one job requesting every CPU (Snakemake's OMP_NUM_THREADS = the rule's cpus = all);
- pair, budgeted: two jobs at once, each requesting half the CPUs (what Snakemake -c N runs for two rules of
  N/2 cpus, or SLURM on a shared node);
- pair, unbudgeted: two jobs at once, each taking every CPU (torch's default before restok.cpus).

It prints the pairs' summed throughput over the one alone. Two budgeted jobs should do at least the work of one
alone (ratio >= 1); the unbudgeted pair shows what oversubscription costs. Trust only gaps above ~10%: the
machine's other load moves single runs by that much.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(batch: int, steps: int) -> None:
    import restok.stages  # noqa: F401  (sets torch's threads from the job's CPUs, as for every stage)
    import torch

    spec = importlib.util.spec_from_file_location("tokenizer_benchmark", HERE / "tokenizer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.measure(bench.tokenizer_cfg("default"), batch, torch.device("cpu"), False, "none", steps, 1)
    print(json.dumps({"threads": torch.get_num_threads(), "images_per_s": row["train_images_per_s"]}))


def run_jobs(cpus_each: list[int], batch: int, steps: int) -> list[dict]:
    """Start one job per entry at once, each with OMP_NUM_THREADS = its CPUs; returns their reports."""
    env = {k: v for k, v in os.environ.items() if k not in ("RESTOK_CPUS", "SLURM_CPUS_PER_TASK")}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--batch", str(batch), "--steps", str(steps)],
            env={**env, "OMP_NUM_THREADS": str(n)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in cpus_each
    ]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a benchmark job failed: {outs}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per job (after 1 warm-up step)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.batch, args.steps)
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if n < 2:
        raise SystemExit("needs at least 2 CPUs to run two jobs on their own halves")
    runs = {"alone": [n], "pair, budgeted": [n // 2, n - n // 2], "pair, unbudgeted": [n, n]}
    results = {name: run_jobs(cpus, args.batch, args.steps) for name, cpus in runs.items()}
    alone = results["alone"][0]["images_per_s"]
    print(
        f"cpu budget benchmark: {n} CPUs, tokenizer train step (default profile, 64 px), batch {args.batch}, "
        f"{args.steps} steps per job"
    )
    for name, rows in results.items():
        total = sum(r["images_per_s"] for r in rows)
        jobs = ", ".join(f"{r['threads']} threads {r['images_per_s']:.2f} img/s" for r in rows)
        print(f"{name:18s}: {jobs} | total {total:.2f} img/s = {total / alone:.2f} x alone")


if __name__ == "__main__":
    sys.exit(main())
