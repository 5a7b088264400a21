"""The pieces of a SLURM submission, without running a workflow: the launcher's srun/torchrun command, the sbatch
options of the sbatch profile's submit script, and the job status script when sacct knows nothing.

    python -m pytest -q tests/slurm/test_submission.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from restok import launch

SCRIPTS = Path(__file__).resolve().parents[2] / "workflow" / "scripts"


def script_module(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("in_step", [False, True])
def test_multi_node_launch_is_one_srun_step_with_a_free_port(monkeypatch, in_step):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", socket.gethostname())
    monkeypatch.setenv("PATH", f"{Path(__file__).parent / 'fakes'}{os.pathsep}{os.environ['PATH']}")  # scontrol
    if in_step:
        monkeypatch.setenv("SLURM_STEP_ID", "0")
    else:
        monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    cmd = launch.torchrun_command("restok.stages.train_generator", ["--params", "p.yaml"], nproc=4, nnodes=2)
    host, port = cmd[cmd.index("--rdzv-backend=c10d") + 1].removeprefix("--rdzv-endpoint=").rsplit(":", 1)
    assert host == socket.gethostname() and 0 < int(port) < 65536
    with socket.socket() as s:  # the port was free here: it can be bound again now that the probe closed it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", int(port)))
    assert cmd == [
        "srun",
        *(["--overlap"] if in_step else []),
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=4",
        "--max-restarts=3",
        "--nnodes=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={host}:{port}",
        "--rdzv-id=4242",
        "-m",
        "restok.stages.train_generator",
        "--params",
        "p.yaml",
    ]


def test_multi_node_outside_slurm_is_refused(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RuntimeError, match="RESTOK_NNODES=2 needs a SLURM allocation"):
        launch.torchrun_command("restok.stages.sample", [], nproc=1, nnodes=2)


def submit_args(**kw) -> list[str]:
    a = dict(
        rule="train_tokenizer",
        nodes=1,
        gpus_per_node=0,
        cpus=8,
        mem_mb=16000,
        runtime=60,
        cpu_partition="cpu",
        gpu_partition="gpu",
        jobscript="job.sh",
    )
    return script_module("slurm_submit").sbatch_args(argparse.Namespace(**{**a, **kw}))


def test_sbatch_profile_gpus_per_node_and_partitions():
    assert submit_args(rule="shard") == [
        "sbatch",
        "--parsable",
        "--job-name=smk-shard",
        "--partition=cpu",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=8",
        "--mem=16000",
        "--time=60",
        "--output=logs/slurm/shard-%j.out",
    ]
    assert submit_args(nodes=2, gpus_per_node=4) == [
        "sbatch",
        "--parsable",
        "--job-name=smk-train_tokenizer",
        "--partition=gpu",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gres=gpu:4",
        "--cpus-per-task=8",
        "--mem=16000",
        "--time=60",
        "--output=logs/slurm/train_tokenizer-%j.out",
    ]


def fake_tools(tmp_path: Path, sacct: str, squeue: str) -> dict:
    for name, out in (("sacct", sacct), ("squeue", squeue)):
        f = tmp_path / name
        f.write_text(f"#!/bin/sh\nprintf '{out}'\n")
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize(
    "sacct, squeue, want",
    [
        ("", "", "failed"),  # known to neither: gone, not "running" forever
        ("", "PENDING\\n", "running"),  # accounting lags behind the queue
        ("RUNNING\\n", "", "running"),
        ("COMPLETED\\n", "", "success"),
        ("CANCELLED by 1000\\n", "", "failed"),
        ("TIMEOUT\\n", "", "failed"),
    ],
)
def test_status_script(tmp_path, sacct, squeue, want):
    p = subprocess.run(
        [sys.executable, str(SCRIPTS / "slurm_status.py"), "77;cluster"],
        capture_output=True,
        text=True,
        env=fake_tools(tmp_path, sacct, squeue),
        check=True,
    )
    assert p.stdout == f"{want}\n"
    assert ("unknown to sacct and squeue" in p.stderr) == (not sacct and not squeue)


DOWN = (1, "", "sacct: error: slurmdbd: Connection refused\n")  # the database or controller cannot be reached
GONE = (1, "", "slurm_load_jobs error: Invalid job id specified\n")  # squeue: the job has left the queue


def answering(tmp_path: Path, **tools: list[tuple[int, str, str]]) -> dict:
    """Fake tools answering (exit status, stdout, stderr) per call, the last one again for later calls."""
    for name, answers in tools.items():
        f = tmp_path / name
        f.write_text(
            f"#!{sys.executable}\nimport pathlib, sys\ncalls = pathlib.Path({str(tmp_path / name)!r} + '.calls')\n"
            f"n = len(calls.read_text()) if calls.exists() else 0\ncalls.write_text('x' * (n + 1))\n"
            f"rc, out, err = {answers!r}[min(n, {len(answers) - 1})]\n"
            f"sys.stdout.write(out)\nsys.stderr.write(err)\nsys.exit(rc)\n"
        )
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize(
    "sacct, squeue, want, calls",
    [
        ([DOWN], [DOWN], "running", (3, 3)),  # SLURM cannot be asked: no end state known, ask again later
        ([DOWN], [GONE], "running", (3, 1)),  # out of the queue, but how it ended is unknown
        ([(0, "", "")], [GONE], "failed", (1, 1)),  # known to neither: gone
        ([DOWN, (0, "COMPLETED\n", "")], [DOWN], "success", (2, 0)),  # a transient error, then the answer
    ],
)
def test_status_script_reads_a_failing_query_as_running(tmp_path, sacct, squeue, want, calls):
    p = subprocess.run(
        [sys.executable, str(SCRIPTS / "slurm_status.py"), "77;cluster"],
        capture_output=True,
        text=True,
        env=answering(tmp_path, sacct=sacct, squeue=squeue),
        check=True,
    )
    assert p.stdout == f"{want}\n", p.stderr
    made = tuple(
        len((tmp_path / f"{name}.calls").read_text()) if (tmp_path / f"{name}.calls").exists() else 0
        for name in ("sacct", "squeue")
    )
    assert made == calls
    assert ("failed 3 times" in p.stderr) == (want == "running")


def test_status_script_without_accounting_sees_ended_jobs(tmp_path):
    """With accounting off, sacct answers nothing and squeue decides; real squeue lists a job that has ended
    (COMPLETED, FAILED, ...) only with --states=all, so without that option every finished job read as gone, i.e.
    failed (found on the real cluster of tools/local-slurm)."""
    for name, script in (
        ("sacct", "echo 'Slurm accounting storage is disabled' >&2; exit 1"),
        ("squeue", 'case " $* " in *" --states=all "*) echo COMPLETED;; esac'),
    ):
        (tmp_path / name).write_text(f"#!/bin/sh\n{script}\n")
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run(
        [sys.executable, str(SCRIPTS / "slurm_status.py"), "77"], capture_output=True, text=True, env=env, check=True
    )
    assert p.stdout == "success\n", p.stderr
