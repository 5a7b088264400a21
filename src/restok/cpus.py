"""The CPUs a job requested, and keeping torch and the data loaders to them.

A job gets the CPUs its rule requests (params `resources.<stage>.cpus`): Snakemake runs the rule with that many
threads and exports them as OMP_NUM_THREADS; SLURM sets SLURM_CPUS_PER_TASK and the process's CPU affinity. Left
to its default, torch starts one intra-op thread per core of the machine, so two jobs side by side on one node
each run as many threads as there are cores and thrash (measured: two train_tokenizer runs on 2 cores did about
3x less work together than one alone). `limit_threads()` runs once per stage process, from `restok.stages`
(every `python -m restok.stages.<stage>` imports that package first); the launcher passes the job's count to its
torchrun workers as RESTOK_CPUS, and each worker takes its share.
"""

from __future__ import annotations

import os

import torch


def job_cpus() -> int:
    """CPUs of this job: RESTOK_CPUS (set by restok.launch for its workers), else the smallest of the CPU
    affinity, SLURM_CPUS_PER_TASK and OMP_NUM_THREADS (Snakemake's rule threads) that are set."""
    if os.environ.get("RESTOK_CPUS", "").isdigit():
        return max(1, int(os.environ["RESTOK_CPUS"]))
    limits = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1]
    for var in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            limits.append(int(value))
    return min(limits)


def process_cpus() -> int:
    """This process's share of the job's CPUs: torchrun starts LOCAL_WORLD_SIZE processes on each node."""
    return max(1, job_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def loader_workers(requested: int) -> int:
    """Data-loader processes next to a process that computes: at most its CPUs minus the one it uses itself."""
    return min(requested, process_cpus() - 1)


def limit_threads() -> int:
    """Set torch's intra-op threads to this process's share of the job's CPUs; returns it."""
    n = process_cpus()
    torch.set_num_threads(n)
    return n
