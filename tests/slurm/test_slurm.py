"""The workflow through both SLURM profiles, end to end on the smoke profile, with fake SLURM executables.

tests/slurm/fakes/ holds sbatch, sacct, squeue, scancel, sinfo, srun, ... that run each job locally and answer
in the formats the plugins parse (docs/tooling.md, ecosystem §2); sbatch and srun record their arguments.
Each profile builds the smoke run's first stages (`shard`, `cache_features`: the end-to-end runs through both
profiles are test_real_slurm.py's, on a real cluster), having submitted the CPU rule `shard` with exactly the
options its params `resources` mean. Then `train_tokenizer` is set to 2 nodes x 4 GPUs and submitted alone: sbatch must get
GPUs per node (--gres) with one task per node, and the job's command must start exactly one srun (the launcher's,
one torchrun agent per node, rendezvous on this host at a free port), never a step inside a step. The fake srun
refuses a 2-node step (one machine), so that job fails after recording its arguments.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline.conftest import BIN, make_workspace, run

FAKES = Path(__file__).parent / "fakes"
pytestmark = pytest.mark.slurm


def slurm_env(tmp_path: Path) -> dict:
    return {
        "PATH": f"{FAKES}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_STATE": str(tmp_path / "slurm-state"),
    }


def sbatch_calls(state: Path, ws: Path) -> list[list[str]]:
    """Each sbatch call's arguments, the workspace path written WS, the plugin's run uuid (its job name) *,
    without the job itself (the plugin's --wrap, cluster-generic's job script)."""
    calls = []
    for f in sorted(state.glob("*.args")):
        args = [
            a.replace(str(ws), "WS")
            for a in f.read_text().split("\n")
            if not a.startswith("--wrap=") and not a.endswith(".sh")
        ]
        if "--job-name" in args:
            args[args.index("--job-name") + 1] = "*"
        calls.append(args)
    return calls


def srun_calls(state: Path) -> list[list[str]]:
    f = state / "srun.calls"
    return [line.split("\t") for line in f.read_text().splitlines()] if f.exists() else []


def check_outputs(ws: Path):
    manifest = json.loads((ws / "data/shard/train/manifest.json").read_text())
    assert manifest["num_samples"] == 48
    assert (ws / "data/cache_features/manifest.json").is_file()


def resources(ws: Path, stage: str) -> dict:
    return yaml.safe_load((ws / "params.yaml").read_text())["resources"][stage]


def submit_two_nodes_four_gpus(ws: Path, state: Path, profile: list[str], env: dict) -> dict:
    """Set train_tokenizer to 2 nodes x 4 GPUs and submit it alone; check the one srun its command starts (the
    launcher's); returns its resources."""
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["resources"]["train_tokenizer"].update(gpus=4, nodes=2)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for f in [*state.glob("*.args"), state / "srun.calls"]:
        f.unlink(missing_ok=True)
    p = run(
        ["snakemake", *profile, "-R", "train_tokenizer", "--until", "train_tokenizer", "--retries", "0"],
        ws,
        env=env,
        check=False,
        timeout=600,
    )
    assert p.returncode != 0, "the fake srun cannot run 2 nodes: the job must fail"
    (job,) = [f.stem for f in state.glob("*.args")]
    (call,) = srun_calls(state)  # the launcher's, not nested in a jobstep's srun
    endpoint = re.fullmatch(rf"--rdzv-endpoint={re.escape(socket.gethostname())}:(\d+)", call[11])
    assert endpoint and int(endpoint[1]) != 29500, call  # this host (the first node), a free port
    assert call[:11] + call[12:16] == [
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
        f"--rdzv-id={job}",
        "-m",
        "restok.stages.train_tokenizer",
        "--params",
    ], call
    return params["resources"]["train_tokenizer"]


def test_slurm_executor_plugin(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    env, state = slurm_env(tmp_path), tmp_path / "slurm-state"
    profile = [
        "--workflow-profile",
        "workflow/profiles/slurm",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--seconds-between-status-checks",
        "1",
        "--latency-wait",
        "5",
    ]
    run(["snakemake", *profile, "--until", "cache_features"], ws, env=env, timeout=600)
    check_outputs(ws)
    r = resources(ws, "shard")
    assert r["gpus"] == 0
    assert [
        "--parsable",
        "--job-name",
        "*",
        "--output",
        "WS/.snakemake/slurm_logs/rule_shard/%j.log",
        "--export=ALL",
        "--comment",
        "rule_shard",
        "-p",
        "cpu",
        "-t",
        str(r["runtime"]),
        "--mem",
        str(r["mem_mb"]),
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={r['cpus']}",
        "-D",
        "WS",
    ] in sbatch_calls(state, ws)
    (step,) = [c for c in srun_calls(state) if "shard:" in c]  # the jobstep runs the rule in one step
    assert step[:5] == ["-n1", "--cpu-bind=q", f"--cpus-per-task={r['cpus']}", "--nodes=1", sys.executable]

    r = submit_two_nodes_four_gpus(ws, state, profile, env)
    assert sbatch_calls(state, ws) == [
        [
            "--parsable",
            "--job-name",
            "*",
            "--output",
            "WS/.snakemake/slurm_logs/rule_train_tokenizer/%j.log",
            "--export=ALL",
            "--comment",
            "rule_train_tokenizer",
            "-p",
            "gpu",
            "-t",
            str(r["runtime"]),
            "--mem",
            str(r["mem_mb"]),
            "--nodes=2",
            "--ntasks=2",
            f"--cpus-per-task={r['cpus']}",
            "-D",
            "WS",
            "--gres=gpu:4",
        ]
    ]


def test_cluster_generic_sbatch(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    env, state = slurm_env(tmp_path), tmp_path / "slurm-state"
    profile = [
        "--workflow-profile",
        "workflow/profiles/sbatch",
        "--seconds-between-status-checks",
        "1",
        "--latency-wait",
        "5",
    ]
    run(["snakemake", *profile, "--until", "cache_features"], ws, env=env, timeout=600)
    check_outputs(ws)
    r = resources(ws, "shard")
    assert [
        "--parsable",
        "--job-name=smk-shard",
        "--partition=cpu",
        "--nodes=1",
        "--ntasks-per-node=1",
        f"--cpus-per-task={r['cpus']}",
        f"--mem={r['mem_mb']}",
        f"--time={r['runtime']}",
        "--output=logs/slurm/shard-%j.out",
    ] in sbatch_calls(state, ws)
    assert srun_calls(state) == [], "a one-node job runs its command without srun"

    r = submit_two_nodes_four_gpus(ws, state, profile, env)
    assert sbatch_calls(state, ws) == [
        [
            "--parsable",
            "--job-name=smk-train_tokenizer",
            "--partition=gpu",
            "--nodes=2",
            "--ntasks-per-node=1",
            "--gres=gpu:4",
            f"--cpus-per-task={r['cpus']}",
            f"--mem={r['mem_mb']}",
            f"--time={r['runtime']}",
            "--output=logs/slurm/train_tokenizer-%j.out",
        ]
    ]
