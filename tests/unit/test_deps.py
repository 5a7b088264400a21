"""Stage deps = stage imports: no stage imports another, and dvc.yaml and the rules list exactly the
files each stage module reaches through its `restok.*` imports (read with the AST, never executed).

    python -m pytest -q tests/unit/test_deps.py
    restok deps --write      # the fix when test_declared_deps_are_current fails

The walk is also tested on a throwaway package (what counts as an import, how the code hash follows an edit);
the end-to-end consequence (editing src/restok/metrics.py makes `dvc status` flag exactly its importers) is in
tests/pipeline/test_dvc.py.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from restok import deps

REPO = Path(__file__).resolve().parents[2]
STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another_stage(stage):
    imported = {deps.module_file(m) for m in deps.direct_imports(deps.module_file(f"restok.stages.{stage}"))}
    others = sorted(f.stem for f in imported if f.parent.name == "stages" and f.stem != stage)
    assert not others, f"stages/{stage}.py imports the stage(s) {others}: move the shared code to a library module"
    assert all(
        f.parent.name != "stages"
        for f in deps.closure(f"restok.stages.{stage}")
        if f.stem != stage and f.name != "__init__.py"
    )


def _src(paths) -> set[str]:
    return {p for p in paths if p.startswith("src/")}


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_are_exactly_the_imported_files(stage):
    declared = _src(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"])
    imported = set(deps.stage_deps(stage))
    assert not imported - declared, f"{stage}: imported but not a dep (an edit would not rerun it)"
    assert not declared - imported, f"{stage}: declared but never imported (an edit would rerun it for nothing)"
    assert all((REPO / p).is_file() for p in declared)


def test_declared_deps_are_current():
    """dvc.yaml and every rules file equal what `restok deps --write` would write (the Snakefile's equality with
    dvc.yaml is tests/pipeline/test_graphs.py)."""
    stale = [str(path.relative_to(REPO)) for path, (old, new) in deps.regenerate(REPO).items() if old != new]
    assert not stale, f"{stale} out of date: run `restok deps --write`"


TORCH_FREE_CONFIGS = {  # model, loss and sampling configs that params sections are typed with
    "src/restok/losses/loss_config.py",
    "src/restok/models/generator_config.py",
    "src/restok/models/recompute_mode.py",
    "src/restok/models/tokenizer_config.py",
    "src/restok/sampling_config.py",
}


def _section_modules() -> dict[str, str]:
    """section name -> the restok.config module defining its type, read from restok.config.sections (AST)."""
    tree = ast.parse((REPO / "src/restok/config/sections.py").read_text())
    defined_in = {
        alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module.startswith("restok.config.")
        for alias in node.names
    }
    (table,) = [n.value for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and n.target.id == "SECTIONS"]
    return {k.value: defined_in[v.id] for k, v in zip(table.keys, table.values) if v.id in defined_in}


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_the_config_of_the_sections_it_reads(stage):
    """A stage's config deps are the loader and the modules of the sections in its PARAMS (and what those import),
    never the whole-file check or another section's module: an edit there must not rerun it."""
    module = importlib.import_module(f"restok.stages.{stage}")
    where = _section_modules()
    own = {where[name] for name in module.PARAMS if name != "profile"}
    expected = {"restok.config.load"} | own
    expected = {deps.repo_path(f) for m in expected for f in deps.closure(m) if "/config/" in deps.repo_path(f)}
    got = {p for p in deps.stage_deps(stage) if p.startswith("src/restok/config/")}
    assert got == expected
    assert not got & {f"src/restok/config/{m}.py" for m in ("validate", "sections", "profiles", "schema")}


def test_shard_pulls_in_no_model_loss_sampling_or_training_code():
    """`shard` builds no model and reads no model section: an edit to model, loss, sampling or training code (model
    configs included) must not rerun it."""
    shard = deps.stage_deps("shard")
    assert not [p for p in shard if p.startswith(("src/restok/models/", "src/restok/losses/"))]
    assert [p for p in shard if p.startswith("src/restok/train/")] == ["src/restok/train/log.py"]  # its console
    assert not {"src/restok/sampling.py", "src/restok/sampling_config.py"} & set(shard)
    for path in sorted(TORCH_FREE_CONFIGS):
        tree = ast.parse((REPO / path).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in imported if m.split(".")[0] in ("torch", "restok")}, f"{path} imports {imported}"


def test_update_keeps_data_deps_order_and_comments():
    text = (
        "# comment\nstages:\n  a:\n    cmd: x\n    deps:\n      - src/restok/old.py\n      - src/restok/models\n"
        "      - data/shard\n    params:\n      - a\n"
    )
    got = deps.update_dvc_yaml(text, {"a": ["src/restok/new.py", "src/restok/z.py"]})
    assert got == (
        "# comment\nstages:\n  a:\n    cmd: x\n    deps:\n      - src/restok/new.py\n"
        "      - src/restok/z.py\n      - data/shard\n    params:\n      - a\n"
    )
    rules = 'rule a:\n    input:\n        "data/x",\n        "src/restok/old.py",\n    output:\n        "y",\n'
    new, found = deps.update_rules(rules, {"a": ["src/restok/new.py"], "b": []})
    assert found == {"a"}
    assert new == 'rule a:\n    input:\n        "data/x",\n        "src/restok/new.py",\n    output:\n        "y",\n'
    with pytest.raises(deps.DepsError, match="stage 'b'"):
        deps.update_dvc_yaml(text, {"b": []})


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A throwaway `restok` package: stages/s.py imports a (inside a function), a imports b; c is not imported."""
    root = tmp_path / "restok"
    files = {
        "__init__.py": '"""doc"""\n__version__ = "0"\n',
        "stages/__init__.py": "",
        "stages/s.py": "import os\n\ndef f():\n    from restok import a\n",
        "a.py": "from restok.b import thing\n",
        "b.py": "thing = 1\n",
        "c.py": "thing = 2\n",
        "pkg/__init__.py": "from restok.c import thing\n",
        "d.py": "import restok.pkg\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    monkeypatch.setattr(deps, "PACKAGE", root)
    deps.direct_imports.cache_clear()
    yield root
    deps.direct_imports.cache_clear()


def test_walk_follows_function_level_imports_and_skips_constant_inits(package):
    assert [deps.repo_path(f) for f in deps.closure("restok.stages.s")] == [
        "src/restok/a.py",
        "src/restok/b.py",
        "src/restok/stages/s.py",
    ]
    # a package __init__ that imports something is code the importer runs
    assert [deps.repo_path(f) for f in deps.closure("restok.d")] == [
        "src/restok/c.py",
        "src/restok/d.py",
        "src/restok/pkg/__init__.py",
    ]
    with pytest.raises(deps.DepsError, match="restok.missing"):
        deps.closure("restok.missing")


def test_code_hash_follows_imported_files_only(package):
    before = deps.code_sha256("restok.stages.s")
    (package / "c.py").write_text("thing = 3\n")  # not imported by s
    assert deps.code_sha256("restok.stages.s") == before
    (package / "b.py").write_text("thing = 4\n")  # imported through a
    assert deps.code_sha256("restok.stages.s") != before


def test_relative_imports_are_refused(package):
    (package / "r.py").write_text("from . import b\n")
    with pytest.raises(deps.DepsError, match="relative import"):
        deps.closure("restok.r")
