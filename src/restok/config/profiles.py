"""Profiles: `workflow/params/<name>.yaml`, overlays on `default.yaml`, written as the params file."""

from __future__ import annotations

from pathlib import Path

import yaml

from restok.config.engine import REPO, ParamsError, deep_merge, read_yaml
from restok.config.validate import validate

PROFILES_DIR = REPO / "workflow" / "params"


def profile_tree(name: str) -> dict:
    """`default.yaml` merged with `<name>.yaml` (an overlay of only the keys it changes)."""
    base = read_yaml(PROFILES_DIR / "default.yaml")
    if name == "default":
        return base
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ParamsError(f"unknown profile {name!r}; known: {known}")
    tree = deep_merge(base, read_yaml(path))
    tree["profile"] = name
    return tree


def write_profile(name: str, dest: str | Path = "params.yaml") -> Path:
    """Validate profile `name` and write it as the params file (atomically)."""
    tree = profile_tree(name)
    validate(tree, f"workflow/params/{name}.yaml")
    dest = Path(dest)
    header = (
        f"# Profile '{name}', written by `restok profile {name}` from workflow/params/. Edit freely;\n"
        f"# every key is validated against workflow/schemas/params.schema.yaml before a stage runs.\n"
    )
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(tree, sort_keys=False))
    tmp.replace(dest)
    return dest
