"""`restok` command line: profiles and the params schema.

restok profile imagenet256     # write workflow/params/imagenet256.yaml (over default.yaml) into params.yaml
restok validate [params.yaml]  # check a params file against the schema, as every stage does first
restok schema                  # regenerate workflow/schemas/params.schema.yaml from src/restok/config/
restok ablate [--dry]          # the ablation grid as DVC experiments, then results/ablations.md (restok.ablate)
restok deps --write            # src deps of dvc.yaml and workflow/rules/*.smk from the imports (restok.deps)
"""

from __future__ import annotations

import argparse
import sys

from restok.config.engine import ParamsError
from restok.config.profiles import write_profile
from restok.config.schema import SCHEMA_PATH, schema_text
from restok.config.validate import check_file


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ablate"]:
        from restok import ablate

        return ablate.main(argv[1:])
    if argv[:1] == ["deps"]:
        from restok import deps

        return deps.main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="restok", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    prof = sub.add_parser("profile", help="write a params profile into params.yaml")
    prof.add_argument("name")
    prof.add_argument("--out", default="params.yaml")
    val = sub.add_parser("validate", help="validate a params file")
    val.add_argument("path", nargs="?", default="params.yaml")
    sub.add_parser("schema", help="regenerate the JSON schema from the dataclasses")
    sub.add_parser("ablate", help="run the ablation grid (see `restok ablate --help`)")
    sub.add_parser("deps", help="stage source deps from the imports (see `restok deps --help`)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "profile":
            print(f"wrote profile {args.name!r} to {write_profile(args.name, args.out)}")
        elif args.cmd == "validate":
            check_file(args.path)
            print(f"{args.path}: ok")
        else:
            SCHEMA_PATH.write_text(schema_text())
            print(f"wrote {SCHEMA_PATH}")
    except ParamsError as e:
        print(f"restok: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
