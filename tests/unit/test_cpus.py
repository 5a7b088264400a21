"""restok.cpus: each job keeps to the CPUs it requested.

    python -m pytest -q tests/unit/test_cpus.py

The count comes from the job's own settings (CPU affinity, SLURM_CPUS_PER_TASK, Snakemake's OMP_NUM_THREADS, or
the launcher's RESTOK_CPUS for torchrun workers); a stage process gets it by importing restok.stages, checked in a
fresh interpreter because the test process has imported torch already.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from restok import cpus

VARS = ("RESTOK_CPUS", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    return monkeypatch


@pytest.mark.parametrize(
    "env, job, per_process, workers",
    [
        ({}, 16, 16, 4),  # alone: the affinity
        ({"OMP_NUM_THREADS": "4"}, 4, 4, 3),  # a Snakemake rule with 4 threads
        ({"SLURM_CPUS_PER_TASK": "8", "OMP_NUM_THREADS": "32"}, 8, 8, 4),  # the smallest limit wins
        ({"OMP_NUM_THREADS": "64"}, 16, 16, 4),  # never more than the affinity
        ({"RESTOK_CPUS": "8", "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "4"}, 8, 2, 1),  # a torchrun worker
        ({"RESTOK_CPUS": "2", "LOCAL_WORLD_SIZE": "4"}, 2, 1, 0),  # fewer CPUs than workers: one each
        ({"OMP_NUM_THREADS": "", "SLURM_CPUS_PER_TASK": "x"}, 16, 16, 4),  # unusable values are ignored
    ],
)
def test_budget(clean_env, env, job, per_process, workers):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert (cpus.job_cpus(), cpus.process_cpus(), cpus.loader_workers(4)) == (job, per_process, workers)


def test_every_stage_process_gets_its_threads():
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    code = "import restok.stages.shard, torch; print(torch.get_num_threads())"
    for extra, want in (({"SLURM_CPUS_PER_TASK": "1"}, "1"), ({"RESTOK_CPUS": "2", "LOCAL_WORLD_SIZE": "2"}, "1")):
        out = subprocess.run(
            [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True, check=True
        ).stdout
        assert out.strip() == want


def test_auto_precision_is_bf16_on_cuda_and_on_cpus_with_native_bf16():
    import torch

    from restok.train.dist import use_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_bf16("bf16", cpu) and not use_bf16("fp32", cuda) and use_bf16("auto", cuda)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert use_bf16("auto", cpu) == native
