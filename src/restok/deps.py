"""What code each stage runs: its module's transitive `restok.*` imports, read from the source (AST), never executed.

    restok deps            # print each stage's source deps
    restok deps --write    # rewrite the src/ deps of dvc.yaml and of the rules in workflow/rules/*.smk from them
    restok deps --check    # exit 1 when dvc.yaml or a rule is out of date (tests/unit/test_deps.py does the same)

A stage declares exactly the files it imports, so an edit reruns exactly the stages that import the edited file
(README.md, "A stage declares as deps every file it imports"). Every import counts, also one inside a function or
under `if TYPE_CHECKING:` (it may run, and the walk stays simple). A package's `__init__.py` counts when it imports or
defines something; one holding only a docstring and constants cannot change what a stage computes. A module imported
by name (importlib) is not followed: the one such import in a stage's path is the whole-file params check
(restok.config.load), which can refuse a params file but never change a value a stage reads, so the config of the
sections a stage does not read is no dep of it. The same file
list gives the code hash in a training run's resume fingerprint (restok.train.ckpt), so a checkpoint of older code
is never resumed.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import sys
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent  # src/restok (or site-packages/restok when installed)
SRC_PREFIX = "src/restok"  # how dvc.yaml and the rules name the package's files


class DepsError(ValueError):
    pass


def module_file(name: str) -> Path | None:
    """The file of module `name` inside the restok package (a package's __init__.py), or None."""
    parts = name.split(".")
    if parts[0] != "restok":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def direct_imports(path: Path) -> frozenset[str]:
    """Names of the restok modules `path` imports (`from a.b import c` gives a.b.c when c is a module, else a.b)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise DepsError(f"{path}:{node.lineno}: relative import; restok uses absolute imports only")
            base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if module_file(sub) is not None else base)
    return frozenset(name for name in found if module_file(name) is not None)


def _parents(name: str) -> list[str]:
    """restok.a.b -> [restok, restok.a] (the packages Python runs before the module)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _defines_something(init: Path) -> bool:
    tree = ast.parse(init.read_text())
    return any(
        isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        for n in ast.walk(tree)
    )


def closure(module: str) -> list[Path]:
    """The files module `module` runs when imported: itself and every restok module reached by its imports."""
    if module_file(module) is None:
        raise DepsError(f"module {module!r} is not a file under {PACKAGE}")
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(direct_imports(module_file(name)))
        todo.extend(_parents(name))
    files = {module_file(name) for name in seen}
    return sorted(f for f in files if f.name != "__init__.py" or _defines_something(f))


def repo_path(path: Path) -> str:
    return f"{SRC_PREFIX}/{path.relative_to(PACKAGE).as_posix()}"


def stage_deps(stage: str) -> list[str]:
    """dvc.yaml-style paths of the files stage `stage` (module restok.stages.<stage>) runs."""
    return [repo_path(f) for f in closure(f"restok.stages.{stage}")]


def code_sha256(module: str) -> str:
    """sha256 over the path and bytes of every file `module` runs: changes with any edit to code it imports."""
    h = hashlib.sha256()
    for f in closure(module):
        h.update(repo_path(f).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


# ------------------------------------------------------------------------------------- dvc.yaml and the rules
def _replace_src_items(lines: list[str], start: int, item: re.Pattern, src: list[str], fmt: str) -> list[str]:
    """The list starting at lines[start] (items matching `item`, same indent) with its src/restok entries replaced
    by `src` (at the position of the first one; the other entries keep their order)."""
    end = start
    while end < len(lines) and item.match(lines[end]):
        end += 1
    values = [item.match(line).group("value") for line in lines[start:end]]
    indent = item.match(lines[start]).group("indent") if end > start else ""
    first = next((i for i, v in enumerate(values) if v.startswith(SRC_PREFIX + "/") or v == SRC_PREFIX), 0)
    kept = [v for v in values if not (v.startswith(SRC_PREFIX + "/") or v == SRC_PREFIX)]
    new = kept[:first] + src + kept[first:]
    return lines[:start] + [fmt.format(indent=indent, value=v) for v in new] + lines[end:]


_DVC_ITEM = re.compile(r"^(?P<indent>\s+)- (?P<value>[^\s:]+)$")
_SMK_ITEM = re.compile(r'^(?P<indent>\s+)"(?P<value>[^"]+)",$')


def update_dvc_yaml(text: str, deps: dict[str, list[str]]) -> str:
    """dvc.yaml with each stage's src deps set to deps[stage]; everything else (comments, order) kept."""
    lines = text.split("\n")
    for stage, src in deps.items():
        try:
            at = lines.index(f"  {stage}:")
            at = next(i for i in range(at + 1, len(lines)) if lines[i].strip() == "deps:")
        except (ValueError, StopIteration):
            raise DepsError(f"dvc.yaml: stage {stage!r} has no `deps:` list") from None
        lines = _replace_src_items(lines, at + 1, _DVC_ITEM, src, "{indent}- {value}")
    return "\n".join(lines)


def update_rules(text: str, deps: dict[str, list[str]]) -> tuple[str, set[str]]:
    """A rules file with the src inputs of each rule it defines set to deps[rule]; returns (text, rules found)."""
    lines = text.split("\n")
    found = set()
    for stage, src in deps.items():
        if f"rule {stage}:" not in lines:
            continue
        found.add(stage)
        at = lines.index(f"rule {stage}:")
        at = next(i for i in range(at + 1, len(lines)) if lines[i].strip() == "input:")
        lines = _replace_src_items(lines, at + 1, _SMK_ITEM, src, '{indent}"{value}",')
    return "\n".join(lines), found


def stage_names(dvc_yaml: Path) -> list[str]:
    import yaml

    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


def regenerate(root: Path) -> dict[Path, tuple[str, str]]:
    """{file: (current text, text with up-to-date deps)} for dvc.yaml and every rules file of `root`."""
    dvc_yaml = root / "dvc.yaml"
    deps = {stage: stage_deps(stage) for stage in stage_names(dvc_yaml)}
    out = {dvc_yaml: (dvc_yaml.read_text(), update_dvc_yaml(dvc_yaml.read_text(), deps))}
    covered = set()
    for rules in sorted((root / "workflow" / "rules").glob("*.smk")):
        text = rules.read_text()
        new, found = update_rules(text, deps)
        covered |= found
        out[rules] = (text, new)
    if missing := set(deps) - covered:
        raise DepsError(f"no rule in {root / 'workflow/rules'} for the dvc.yaml stages {sorted(missing)}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="restok deps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml and workflow/rules/*.smk")
    mode.add_argument("--check", action="store_true", help="exit 1 when they are out of date")
    ap.add_argument("--root", type=Path, default=Path("."), help="the repository (dvc.yaml, workflow/rules)")
    args = ap.parse_args(argv)
    if not (args.write or args.check):
        for stage in stage_names(args.root / "dvc.yaml"):
            print(f"{stage}: {' '.join(stage_deps(stage))}")
        return 0
    stale = {path: new for path, (old, new) in regenerate(args.root).items() if old != new}
    for path, new in stale.items():
        if args.check:
            print(f"{path}: src deps differ from the stage imports; run `restok deps --write`", file=sys.stderr)
        else:
            tmp = path.with_name(f"{path.name}.tmp")
            tmp.write_text(new)
            os.replace(tmp, path)
            print(f"updated {path}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
