#!/usr/bin/env python3
"""Submit command for snakemake-executor-plugin-cluster-generic (workflow/profiles/sbatch): builds the sbatch
options of one job from its resources and execs sbatch with the job script, which is the last argument.

One task per node (the job's command runs once, on the first node; restok.launch starts one torchrun per node
with srun), GPUs per node as --gres=gpu:N only when N > 0, and the GPU or CPU partition accordingly.
"""

import argparse
import os
import sys


def sbatch_args(a: argparse.Namespace) -> list[str]:
    gpu = a.gpus_per_node > 0
    return [
        "sbatch",
        "--parsable",
        f"--job-name=smk-{a.rule}",
        f"--partition={a.gpu_partition if gpu else a.cpu_partition}",
        f"--nodes={a.nodes}",
        "--ntasks-per-node=1",
        *([f"--gres=gpu:{a.gpus_per_node}"] if gpu else []),
        f"--cpus-per-task={a.cpus}",
        f"--mem={a.mem_mb}",
        f"--time={a.runtime}",
        f"--output=logs/slurm/{a.rule}-%j.out",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rule", required=True)
    for name in ("--nodes", "--gpus-per-node", "--cpus", "--mem-mb", "--runtime"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--cpu-partition", required=True)
    p.add_argument("--gpu-partition", required=True)
    p.add_argument("jobscript")
    a = p.parse_args()
    os.makedirs("logs/slurm", exist_ok=True)
    cmd = [*sbatch_args(a), a.jobscript]
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
