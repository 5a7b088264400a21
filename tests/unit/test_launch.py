"""The multi-process launcher (restok.launch): where the rendezvous is hosted, and an error that a torchrun restart
would only repeat (a full disk while checkpointing) failing the run once.

    python -m pytest -q tests/unit/test_launch.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from restok import launch

SCONTROL = """#!/bin/sh
case "$1 $2" in
  "show hostnames") [ "$3" = "gpu-a[17-18]" ] || exit 1; echo gpu-a17; echo gpu-a18 ;;
  "show job") [ "$4" = "4242" ] || exit 1; echo "JobId=4242 JobState=RUNNING NumNodes=2 NodeList=gpu-a[17-18]" ;;
  "show node") [ "$4" = "gpu-a17" ] || exit 1
    echo "NodeName=gpu-a17 Arch=x86_64 CoresPerSocket=8 NodeAddr=10.1.2.17 NodeHostName=gpu-a17 Version=23.11" ;;
  *) exit 2 ;;
esac
"""


@pytest.fixture
def allocation(tmp_path, monkeypatch):
    """A two-node SLURM allocation whose first node's hostname resolves to a loopback address locally."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-a[17-18]")
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-a17.loopback-in-etc-hosts")
    return bin_dir


def test_the_rendezvous_is_hosted_at_slurms_address_of_the_first_node(allocation):
    cmd = launch.torchrun_command("restok.stages.train_generator", ["--params", "params.yaml"], 4, 2)
    endpoint = next(a for a in cmd if a.startswith("--rdzv-endpoint="))
    host, port = endpoint.split("=", 1)[1].rsplit(":", 1)
    assert host == "10.1.2.17" and int(port) > 0
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]


def test_the_node_list_comes_from_scontrol_when_the_environment_lacks_it(allocation, monkeypatch):
    """Snakemake's SLURM jobstep executor strips SLURM_* variables but the job id from the job's command."""
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    cmd = launch.torchrun_command("restok.stages.train_generator", [], 4, 2)
    assert any(a.startswith("--rdzv-endpoint=10.1.2.17:") for a in cmd), cmd


def test_a_failing_scontrol_stops_the_launch_with_a_message(allocation, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "other[1-2]")
    with pytest.raises(RuntimeError, match=r"`scontrol show hostnames other\[1-2\]` failed .*rendezvous address"):
        launch.torchrun_command("restok.stages.train_generator", [], 4, 2)


WORKER = """
import sys
from pathlib import Path

import torch

from restok.train import ckpt

attempts = Path(sys.argv[1])
attempts.write_text(attempts.read_text() + "x" if attempts.exists() else "x")


def disk_full(obj, path):  # what a full filesystem does to the checkpoint write
    with open("/dev/full", "wb") as f:
        torch.save(obj, f)
        f.flush()


ckpt.save_torch_atomic = disk_full
ckpt.save(sys.argv[2], {"step": 7}, 7)
"""


def test_a_full_disk_while_checkpointing_fails_once_not_after_three_restarts(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    attempts, ckpt_dir = tmp_path / "attempts", tmp_path / "ckpt"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "--max-restarts=3",
            str(tmp_path / "worker.py"),
            str(attempts),
            str(ckpt_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )
    assert p.returncode != 0
    assert attempts.read_text() == "x", p.stderr[-3000:]
    assert (
        f"restok: cannot write checkpoint {ckpt_dir / 'step_000000007.pt'}: No space left on device (ENOSPC); "
        f"free space in {ckpt_dir}"
    ) in p.stderr
    assert not list(Path(ckpt_dir).glob("*.pt"))
