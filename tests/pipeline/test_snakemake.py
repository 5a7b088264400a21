"""Snakemake on the smoke profile: the same stages as `dvc dag`, a local run, and nothing to do the second time."""

from __future__ import annotations

import json
import re

from .conftest import run


def test_dry_run_lists_the_dvc_stages(smoke_ws):
    dry = run(["snakemake", "-n", "--forceall", "--quiet", "rules"], smoke_ws).stdout
    smk = {
        line.split()[0]
        for line in dry.splitlines()
        if re.match(r"^\w+\s+\d+$", line.strip()) and not line.startswith(("total", "all"))
    }
    dag = run(["dvc", "dag", "--dot"], smoke_ws).stdout
    dvc = set(re.findall(r'"(\w+)"', dag)) or set(re.findall(r"\b(\w+)\b(?=\s*[;\[])", dag))
    assert smk == dvc, f"snakemake jobs {smk} vs dvc dag {dvc}"


def test_local_run_then_nothing_to_do(smoke_ws):
    run(["snakemake", "-c2"], smoke_ws)
    manifest = json.loads((smoke_ws / "data/shard/train/manifest.json").read_text())
    assert manifest["num_samples"] == 48
    assert (smoke_ws / "logs/shard.log").is_file()
    again = run(["snakemake", "-c2"], smoke_ws)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_ablation_grid_reuses_what_a_variant_does_not_touch(smoke_ws):
    dry = run(["snakemake", "-n", "--forceall", "ablations"], smoke_ws).stdout
    jobs = re.findall(r"rule (ablation_\w+):\s*\n(?:.*\n)*?\s*wildcards: run=(\w+)", dry)
    by_run = {}
    for rule, run_name in jobs:
        by_run.setdefault(run_name, set()).add(rule.removeprefix("ablation_"))
    assert "restok" not in by_run, "the base variant is the base run itself"
    assert by_run["plain_ar"] >= {"train_generator", "sample", "score"}
    assert not by_run["plain_ar"] & {"shard", "cache_features", "train_tokenizer", "extract_latents"}
    assert {"train_tokenizer", "extract_latents", "train_generator"} <= by_run["no_residual_latents"]
    assert "cache_features" not in by_run["no_residual_latents"]
