"""Enum-like model and sampling params are enums in the schema: a typo such as `merge_op: avgpol` is
refused by Snakemake's `validate` (workflow/rules/common.smk, before any job reaches SLURM) and by `restok
validate`, each naming the key, before anything runs.

    python -m pytest -q tests/unit/test_enums.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from restok.config.engine import ParamsError, read_yaml
from restok.config.schema import SCHEMA_PATH
from restok.config.validate import check_file

REPO = Path(__file__).resolve().parents[2]
TYPOS = [  # (dotted key, a typo of an allowed value)
    ("tokenizer.merge_op", "avgpol"),
    ("tokenizer.latent_init", "residual_pooling"),
    ("tokenizer.latent_queries", "hierarchic"),
    ("tokenizer.image_queries", "latent_map"),
    ("tokenizer.weight_init", "fanin"),
    ("generator.mode", "hra"),
    ("sample.sampling.cfg_schedule", "cosine-re"),
]


def enum_of(schema: dict, key: str) -> list:
    node = schema
    for part in key.split("."):
        node = node["properties"][part]
    return node["enum"]


@pytest.mark.parametrize("key, typo", TYPOS)
def test_schema_has_the_enum(key, typo):
    allowed = enum_of(yaml.safe_load(SCHEMA_PATH.read_text()), key)
    assert len(allowed) >= 2 and typo not in allowed


@pytest.mark.parametrize("key, typo", TYPOS)
def test_typo_is_refused_by_snakemake_and_restok(tmp_path, key, typo):
    tree = read_yaml(REPO / "params.yaml")
    node = tree
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = typo
    with pytest.raises(WorkflowError, match=rf"'{typo}' is not one of"):
        validate(tree, schema=str(SCHEMA_PATH))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    with pytest.raises(ParamsError, match=rf"params.yaml:{key}: expected .*got '{typo}'"):
        check_file(path)


def test_restok_validate_command_refuses_the_typo(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("merge_op: subsample", "merge_op: avgpol"))
    p = subprocess.run([sys.executable, "-m", "restok.cli", "validate", str(path)], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr == (f"restok: {path}:tokenizer.merge_op: expected 'subsample' | 'avgpool', got 'avgpol'\n")
