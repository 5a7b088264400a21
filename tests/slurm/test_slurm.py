"""The workflow through both SLURM profiles, end to end on the smoke profile, with fake SLURM executables.

tests/slurm/fakes/ holds sbatch, sacct, squeue, scancel, sinfo, srun, ... that run each job locally and answer
in the formats the plugins parse (shared/notes/ecosystem.md section 2). Besides finishing, each run must have
asked sbatch for the per-rule resources that params.yaml `resources.<rule>` names.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from restok.provenance import read_results
from tests.pipeline.conftest import BIN, make_workspace, run

FAKES = Path(__file__).parent / "fakes"
pytestmark = pytest.mark.slurm


def slurm_env(tmp_path: Path) -> dict:
    return {"PATH": f"{FAKES}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
            "FAKE_SLURM_STATE": str(tmp_path / "slurm-state")}


def submitted_args(state: Path) -> list[str]:
    return [f.read_text() for f in sorted(state.glob("*.args"))]


def check_outputs(ws: Path):
    manifest = json.loads((ws / "data/shard/train/manifest.json").read_text())
    assert manifest["num_samples"] == 48
    headline = read_results(ws / "results/metrics.json")  # written by score, the last stage
    assert headline["profile"] == "smoke" and headline["gFID"] is not None
    assert (ws / "results/cfg_search/cfg_search.json").is_file()


def test_slurm_executor_plugin(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    env = slurm_env(tmp_path)
    run(["snakemake", "--workflow-profile", "workflow/profiles/slurm", "--default-resources",
         "slurm_partition=debug", "--slurm-init-seconds-before-status-checks", "1",
         "--seconds-between-status-checks", "1", "--latency-wait", "5"], ws, env=env, timeout=600)
    check_outputs(ws)
    res = yaml.safe_load((ws / "params.yaml").read_text())["resources"]["shard"]
    (args,) = [a for a in submitted_args(Path(env["FAKE_SLURM_STATE"])) if "rule_shard" in a]
    assert "-p\ndebug" in args and f"--cpus-per-task={res['cpus']}" in args
    assert f"--mem\n{res['mem_mb']}" in args and f"-t\n{res['runtime']}" in args


def test_cluster_generic_sbatch(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    env = slurm_env(tmp_path)
    run(["snakemake", "--workflow-profile", "workflow/profiles/sbatch", "--default-resources",
         "slurm_partition=debug", "slurm_account=proj", "--seconds-between-status-checks", "1",
         "--latency-wait", "5"], ws, env=env, timeout=600)
    check_outputs(ws)
    res = yaml.safe_load((ws / "params.yaml").read_text())["resources"]["shard"]
    (args,) = [a.split("\n") for a in submitted_args(Path(env["FAKE_SLURM_STATE"])) if "smk-shard" in a]
    for flag in ("--partition=debug", "--account=proj", f"--cpus-per-task={res['cpus']}",
                 f"--mem={res['mem_mb']}", f"--time={res['runtime']}", f"--gres=gpu:{res['gpus']}",
                 f"--nodes={res['nodes']}"):
        assert flag in args, f"{flag} not passed to sbatch: {args}"
