"""What a stage calls: its arguments and its params sections, after the whole file was checked.

A stage declares the sections it reads as `PARAMS`, a mapping from section name to the section's type (the same
names as its dvc.yaml `params:`), and gets only those back, so it cannot read a key that DVC does not track for it.
It imports those types, so the code of its own sections (and the model configs behind them) is a dep of the stage
(`restok deps`), and only of the stages that read them.

The whole-file check (`restok.config.validate`: every section and the rules that span sections) still runs before
any stage does work, but it is imported by name: it can only refuse a params file, never change a value a stage
reads, so the code of sections a stage does not read is no dep of it. An edit to the generator's config reruns the
stages that read `generator` and the stages whose code imports the generator, not `shard`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from restok.config.engine import Params, read_yaml

WHOLE_FILE_CHECK = "restok.config.validate"


def load_params(path: str | Path = "params.yaml", sections: Mapping[str, type] | Iterable[str] | None = None) -> Params:
    """Validate the whole file, then return only `sections` (a stage's PARAMS, or section names; all when None).

    The ablation variants are not composed here: a stage never reads them, and inside an ablation run the file is
    already one variant, on which another variant's overrides may legitimately conflict (flat queries with a pooled
    latent init). `restok validate` and `restok ablate` check them against the base file."""
    check = importlib.import_module(WHOLE_FILE_CHECK)
    tree = check.validate(read_yaml(path), path, check_variants=False)
    if sections is None:
        return Params(str(path), tree)
    if isinstance(sections, Mapping):
        for name, tp in sections.items():
            if check.SECTIONS.get(name) is not tp:
                raise TypeError(
                    f"PARAMS maps section {name!r} to {tp!r}, but params.yaml's {name!r} is "
                    f"{check.SECTIONS.get(name)!r} (restok.config.sections)"
                )
    return Params(str(path), {name: tree[name] for name in sections})


def stage_args(
    doc: str | None, params: Mapping[str, type], argv=None, helps: Mapping[str, str] | None = None, **paths: str
) -> tuple[argparse.Namespace, Params]:
    """A stage's opening: `--params` and one option per artifact path (`name=default`; `--name` on the command
    line, '_' written '-'), parsed from `argv`; returns the arguments and the stage's validated sections."""
    args = stage_parser(doc, helps, **paths).parse_args(argv)
    return args, load_params(args.params, params)


def stage_parser(doc: str | None, helps: Mapping[str, str] | None = None, **paths: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    for name, default in paths.items():
        ap.add_argument(f"--{name.replace('_', '-')}", default=default, help=(helps or {}).get(name))
    return ap
