"""dvc.yaml and the Snakefile must declare the same graph, and each stage module the params it is given.

Compared per stage: name, command (the Snakemake shell minus its log redirection), deps (= rule inputs), param
sections (= rule params), and non-persist outs + metrics + plots (= rule outputs). Covers every stage dvc.yaml
declares, so later stages are checked as they land.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def dvc_graph() -> dict:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    graph = {}
    for name, st in stages.items():
        outs = set()
        for kind in ("outs", "metrics", "plots"):
            for o in st.get(kind, []):
                path, opts = (o, {}) if isinstance(o, str) else next(iter(o.items()))
                if not opts.get("persist"):
                    outs.add(path)
        graph[name] = {
            "cmd": st["cmd"],
            "deps": set(st.get("deps", [])),
            "params": set(st.get("params", [])),
            "outs": outs,
        }
    return graph


def smk_graph() -> dict:
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DeploymentSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
        WorkflowSettings,
    )

    with SnakemakeApi(OutputSettings()) as api:
        wf = api.workflow(
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(),
            storage_settings=StorageSettings(),
            workflow_settings=WorkflowSettings(),
            deployment_settings=DeploymentSettings(),
            snakefile=REPO / "Snakefile",
            workdir=REPO,
        )
        graph = {}
        for rule in wf._workflow.rules:
            if rule.name == "all" or rule.name.startswith("ablation"):
                continue  # the ablation grid is derived from dvc.yaml itself (tests/unit/test_ablate.py)
            # the rule adds a log redirection and, for distributed stages, the launcher's env (src/restok/launch.py)
            cmd = re.sub(r"^(RESTOK_\w+=\S+\s+)+", "", rule.shellcmd.split(" > {log}")[0].strip())
            graph[rule.name] = {
                "cmd": cmd,
                "deps": {str(f) for f in rule.input},
                "params": set(rule.params.keys()),
                "outs": {str(f) for f in rule.output},
            }
        return graph


def test_same_stages_commands_deps_params_outs():
    dvc, smk = dvc_graph(), smk_graph()
    assert sorted(dvc) == sorted(smk), "stage names differ between dvc.yaml and the Snakefile"
    for name in dvc:
        for field in ("cmd", "deps", "params", "outs"):
            assert dvc[name][field] == smk[name][field], (
                f"stage {name}: {field} differs\n dvc: {dvc[name][field]}\n smk: {smk[name][field]}"
            )


@pytest.mark.parametrize("stage", sorted(dvc_graph()))
def test_stage_module_declares_the_same_params(stage):
    g = dvc_graph()[stage]
    assert g["cmd"].startswith(f"python -m restok.stages.{stage} "), "a stage runs its own module"
    module = importlib.import_module(f"restok.stages.{stage}")
    assert set(module.PARAMS) == g["params"], f"{stage}: module PARAMS {module.PARAMS} vs dvc.yaml {g['params']}"
    assert f"src/restok/stages/{stage}.py" in g["deps"], "a stage depends on its own module"
