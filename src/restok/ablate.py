"""The paper's ablations in one command: DVC experiments or a Snakemake target, and the table comparing them.

    restok ablate                 # queue every variant x seed as a DVC experiment, run them, write the table
    restok ablate --dry           # only print the dvc commands
    restok ablate table           # (re)write the table from finished DVC experiments
    snakemake ablations -c2       # the same grid with Snakemake (data/ablations/<run>/, results/ablations/<run>/)

Variants are named sets of params overrides (`ablations.variants` in params.yaml, validated as whole params files);
`ablations.seeds` repeats each with both training seeds shifted. A run reruns only the stages whose declared params
(dvc.yaml `params:`) it changes, and everything downstream of them; the rest is reused from the base run: with DVC
through its run-cache, with Snakemake because the variant graph below points those inputs at the base outputs.

The table (`results/ablations.{md,json}`, `ablations.png`, `ablations_grids.png`) has one row per variant (mean ±
std over seeds; the per-position code entropy and its conditional given the class, level by level) and one line per
claim declared in `ablations.comparisons` (variant, versus, metric, the paper's direction), with the verdict agree /
disagree / cannot tell (the difference is within the seed-to-seed spread). No variant name is known to this code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from restok.config.ablations import variant_tree
from restok.config.engine import ParamsError, read_yaml
from restok.config.validate import validate

PREFIX = "abl-"  # DVC experiment names


# ------------------------------------------------------------------------------------------------- the runs
def runs(tree: dict) -> dict[str, dict]:
    """Run name -> params tree, for every variant and seed (`name` alone when seeds == 1, else `name-s<k>`)."""
    ab = tree["ablations"]
    out = {}
    for name in ab["variants"]:
        for k in range(ab["seeds"]):
            out[name if ab["seeds"] == 1 else f"{name}-s{k}"] = variant_tree(tree, name, k)
    return out


def variant_of(run: str) -> str:
    return run.rsplit("-s", 1)[0] if "-s" in run and run.rsplit("-s", 1)[1].isdigit() else run


def overrides(base: dict, tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys whose values differ between two params trees (leaves only)."""
    out = {}
    for key, value in tree.items():
        if key == "ablations":
            continue
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out.update(overrides(base[key], value, f"{prefix}{key}."))
        elif base.get(key) != value:
            out[f"{prefix}{key}"] = value
    return out


# ------------------------------------------------------------------------------------------------ the graph
@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]  # outs + metrics + plots, persist ones excluded


class Graph:
    """The stage graph of dvc.yaml, and how an ablation run maps onto it."""

    def __init__(self, dvc_yaml: str | Path = "dvc.yaml"):
        stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
        self.stages: dict[str, Stage] = {}
        for name, st in stages.items():
            outs = []
            for kind in ("outs", "metrics", "plots"):
                for o in st.get(kind, []):
                    path, opts = (o, {}) if isinstance(o, str) else next(iter(o.items()))
                    if not opts.get("persist"):
                        outs.append(path)
            self.stages[name] = Stage(
                name, st["cmd"], tuple(st.get("deps", [])), tuple(st.get("params", [])), tuple(outs)
            )

    def producer(self, path: str) -> str | None:
        """The stage whose out is `path` or contains it."""
        for st in self.stages.values():
            if any(
                path == o or path.startswith(o.rstrip("/") + "/") or o.startswith(path.rstrip("/") + "/")
                for o in st.outs
            ):
                return st.name
        return None

    def upstream(self, stage: str) -> list[str]:
        return sorted({p for d in self.stages[stage].deps if (p := self.producer(d)) and p != stage})

    def own(self, base: dict, tree: dict) -> set[str]:
        """Stages a run must recompute: its params differ from the base run's, or an upstream stage is recomputed."""
        own: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name, st in self.stages.items():
                if name not in own and (
                    any(base.get(s) != tree.get(s) for s in st.params) or own.intersection(self.upstream(name))
                ):
                    own.add(name)
                    changed = True
        return own

    def path(self, path: str, run: str, own: set[str]) -> str:
        """Where a run reads or writes `path`: under ablations/<run>/ when its producer is recomputed."""
        stage = self.producer(path)
        if stage is None or stage not in own:
            return path
        head, _, rest = path.partition("/")
        return f"{head}/ablations/{run}" + (f"/{rest}" if rest else "")

    def command(self, stage: str, run: str, own: set[str]) -> str:
        """The stage's dvc.yaml command for a run: its params file and every artifact path redirected."""
        out = []
        for tok in shlex.split(self.stages[stage].cmd):
            if tok == "params.yaml":
                tok = f"data/ablations/{run}/params.yaml"
            elif tok.split("/")[0] in ("data", "results"):
                tok = self.path(tok, run, own) if tok != "results" else f"results/ablations/{run}"
            out.append(tok)
        return shlex.join(out)


# ------------------------------------------------------------------------------------------------ DVC path
TARGET = "score"  # an experiment reproduces what the table reads (cfg_search is not part of the grid)


def dvc_queue_command(run: str, base: dict, run_tree: dict) -> list[str]:
    cmd = ["dvc", "exp", "run", "--queue", "-n", PREFIX + run]
    for key, value in overrides(base, run_tree).items():
        cmd += ["-S", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return cmd + [TARGET]


def dvc_queue_commands(tree: dict) -> list[list[str]]:
    return [dvc_queue_command(run, tree, run_tree) for run, run_tree in runs(tree).items()]


def _sh(cmd: list[str], capture: bool = False, env: dict | None = None) -> str:
    """Run a command with this interpreter's bin folder first on PATH, so that `dvc` and the stages' `python` are the
    ones of this environment even when it is not activated (`.venv/bin/restok ablate`)."""
    print("+", shlex.join(cmd), flush=True)
    env = {
        **os.environ,
        **(env or {}),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    p = subprocess.run(cmd, text=True, capture_output=capture, env=env)
    if p.returncode:
        raise SystemExit(f"restok ablate: `{shlex.join(cmd)}` failed ({p.returncode})\n{p.stderr if capture else ''}")
    return p.stdout if capture else ""


def finished_experiments() -> dict[str, tuple[str, dict]]:
    """run -> (rev, params tree) of the finished `abl-` experiments, from `dvc.api.exp_show` (the documented API).

    Queued, running and failed experiments are listed there too; only those with no state (run outside the queue)
    or a successful one count. The params tree is the experiment commit's params.yaml: exp_show's flattened
    columns turn ints into floats and lists into strings, so they cannot be compared with a params tree."""
    import dvc.api

    found = {}
    for row in dvc.api.exp_show():
        name = row.get("Experiment") or ""
        if name.startswith(PREFIX) and row.get("rev") and row.get("State") in (None, "Success"):
            params = yaml.safe_load(_sh(["git", "show", f"{row['rev']}:params.yaml"], capture=True))
            found[name.removeprefix(PREFIX)] = (row["rev"], params)
    return found


def plan(tree: dict, finished: dict[str, tuple[str, dict]]) -> tuple[list[str], list[str], list[str]]:
    """(up to date, stale, missing) runs: a finished experiment is up to date when its params equal the run's
    (the `ablations` section aside: no stage reads it, so adding a variant leaves the others up to date)."""

    def stage_params(params):
        return {k: v for k, v in (params or {}).items() if k != "ablations"}

    fresh, stale, missing = [], [], []
    for run, run_tree in runs(tree).items():
        if run not in finished:
            missing.append(run)
        elif stage_params(finished[run][1]) == stage_params(run_tree):
            fresh.append(run)
        else:
            stale.append(run)
    return fresh, stale, missing


def run_dvc(tree: dict, dry: bool) -> None:
    """Queue the runs with no up-to-date experiment (replacing stale ones) and run the queue.

    A rerun with nothing changed queues nothing. After a params change every affected run is queued again, and
    DVC's run-cache restores each stage whose command, deps and params are unchanged, so only the stages downstream
    of the change run."""
    finished = finished_experiments() if not dry else {}
    fresh, stale, missing = plan(tree, finished)
    all_runs = runs(tree)
    cmds = [["dvc", "exp", "remove", *(PREFIX + r for r in stale)]] if stale else []
    cmds += [dvc_queue_command(r, tree, all_runs[r]) for r in all_runs if r in stale or r in missing]
    if fresh:
        print(f"up to date: {', '.join(fresh)}", flush=True)
    if not cmds:
        print("every ablation run is up to date: nothing to run", flush=True)
        return
    jobs = min(tree["ablations"]["jobs"], len(cmds) - bool(stale))  # no more workers than queued runs
    cmds.append(["dvc", "exp", "run", "--run-all", "-j", str(jobs)])
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))}
    if dry:
        print("\n".join(shlex.join(c) for c in cmds))
        return
    for cmd in cmds[:-1]:
        _sh(cmd)
    _sh(cmds[-1], env=threads if jobs > 1 else None)  # each experiment's stages use their share of the cores


def headline(metrics: str, provenance: str | None) -> dict:
    """results/metrics.json with results/provenance.json beside it (the headline's strings and timings, written
    apart so that `dvc metrics diff` shows numbers only; restok.provenance.write_results)."""
    return {**(json.loads(provenance) if provenance else {}), **json.loads(metrics)}


def collect_dvc(tree: dict) -> dict[str, dict]:
    """run -> {"metrics", "scores", "grid" (PNG bytes or None)} from the up-to-date DVC experiments."""
    finished = finished_experiments()
    fresh, stale, _ = plan(tree, finished)
    if stale:
        print(
            f"restok ablate: skipping experiments whose params differ from params.yaml now: {', '.join(stale)} "
            "(`restok ablate` reruns them)",
            file=sys.stderr,
        )
    out = {}
    for run in fresh:
        rev = finished[run][0]
        read = lambda path: subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True)  # noqa: E731
        metrics, info, scores, grid = (
            read(p)
            for p in (
                "results/metrics.json",
                "results/provenance.json",
                "results/score/metrics.json",
                "results/sample/grid.png",
            )
        )
        if metrics.returncode == 0:
            out[run] = {
                "metrics": headline(metrics.stdout, info.stdout if info.returncode == 0 else None),
                "scores": json.loads(scores.stdout) if scores.returncode == 0 else {},
                "grid": grid.stdout if grid.returncode == 0 else None,
            }
    return out


def collect_files(tree: dict, graph: Graph) -> dict[str, dict]:
    """run -> results, read from the Snakemake layout (base paths for what a run reuses)."""
    out = {}
    for run, run_tree in runs(tree).items():
        own = graph.own(tree, run_tree)
        metrics = Path(graph.path("results/metrics.json", run, own))
        if metrics.is_file():
            scores = Path(graph.path("results/score/metrics.json", run, own))
            grid = Path(graph.path("results/sample/grid.png", run, own))
            info = metrics.with_name("provenance.json")
            out[run] = {
                "metrics": headline(metrics.read_text(), info.read_text() if info.is_file() else None),
                "scores": json.loads(scores.read_text()) if scores.is_file() else {},
                "grid": grid.read_bytes() if grid.is_file() else None,
            }
    return out


# ------------------------------------------------------------------------------------------------- the table
COLUMNS = (
    ("rFID", "rFID"),
    ("gFID", "gFID"),
    ("IS", "IS"),
    ("PSNR_dB", "PSNR"),
    ("probe_sample_accuracy", "class acc."),
    ("codebook_usage", "usage"),
    ("sampling_steps", "steps"),
    ("generate_images_per_s", "img/s"),
    ("train_tokenizer_seconds", "tok train s"),
    ("train_generator_seconds", "gen train s"),
)
# per-level metrics (lists, coarse level first): extract_latents' val codes through score's headline
LEVEL_COLUMNS = (
    ("code_position_entropy_bits", "entropy per position, per level (bits)"),
    ("code_conditional_entropy_bits", "entropy given the class, per level (bits)"),
)


def _mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return mean, std


def _level_mean_std(lists: list) -> tuple[list | None, list | None]:
    """Per-level mean and std over runs of list-valued metrics (runs without the list are left out)."""
    lists = [lv for lv in lists if isinstance(lv, list) and lv]
    if not lists or len({len(lv) for lv in lists}) > 1:
        return None, None
    stats = [_mean_std(list(col)) for col in zip(*lists)]
    return [m for m, _ in stats], (None if len(lists) < 2 else [sd for _, sd in stats])


def verdict(difference: float, spread: float | None, expect: str | None) -> str:
    """Does a difference (variant - versus, mean over seeds) support the paper's direction?

    The spread is sqrt(std_variant^2 + std_versus^2), the seed-to-seed spread of the difference of two runs: a
    difference within it cannot be told from seed noise. With one run per variant there is no spread to judge by."""
    if spread is None:
        return "cannot tell (one run per variant: no spread)"
    if abs(difference) <= spread:
        return "cannot tell (difference within the spread)"
    if expect is None:
        return "differs (no stated direction)"
    return "agree" if (difference < 0) == (expect == "lower") else "disagree"


def compare(rows: dict[str, dict], claim: dict) -> dict:
    """One declared comparison (params ablations.comparisons) on the variant rows.

    Returns the claim with `values`: one {"variant", "versus", "difference", "spread", "verdict"} for a scalar metric,
    one per level for a per-level metric (`per_level` True), and an overall `verdict`."""
    a, b, key = claim["variant"], claim["versus"], claim["metric"]
    out = {**claim, "per_level": False, "values": []}
    absent = [name for name in (a, b) if name not in rows or rows[name].get(key) is None]
    if absent:
        return {**out, "verdict": f"missing: no {key} from finished runs of {', '.join(absent)}"}
    means, stds = [rows[a][key], rows[b][key]], [rows[a][f"{key}_std"], rows[b][f"{key}_std"]]
    if isinstance(means[0], list):
        if len(means[0]) != len(means[1]):
            return {**out, "verdict": f"cannot tell ({a} has {len(means[0])} levels, {b} has {len(means[1])})"}
        out["per_level"] = True
        stds = [sd or [None] * len(means[0]) for sd in stds]
    else:
        means, stds = [[m] for m in means], [[sd] for sd in stds]
    for va, vb, sa, sb in zip(*means, *stds):
        spread = math.hypot(sa, sb) if sa is not None and sb is not None else None
        out["values"].append(
            {
                "variant": va,
                "versus": vb,
                "difference": va - vb,
                "spread": spread,
                "verdict": verdict(va - vb, spread, claim.get("expect")),
            }
        )
    verdicts = [v["verdict"] for v in out["values"]]
    out["verdict"] = (
        verdicts[0]
        if len(set(verdicts)) == 1
        else "per level: " + "; ".join(f"{i}: {v}" for i, v in enumerate(verdicts))
    )
    return out


def summarise(tree: dict, results: dict[str, dict]) -> dict:
    """One row per variant (mean and std over seeds) and the comparisons declared in `ablations.comparisons`."""
    rows = {}
    for variant in tree["ablations"]["variants"]:
        got = [r for run, r in results.items() if variant_of(run) == variant]
        if not got:
            continue
        row = {"variant": variant, "runs": len(got), "overrides": tree["ablations"]["variants"][variant]}
        for key, _ in COLUMNS:
            row[key], row[f"{key}_std"] = _mean_std([r["metrics"].get(key) for r in got])
        for key, _ in LEVEL_COLUMNS:
            row[key], row[f"{key}_std"] = _level_mean_std([r["metrics"].get(key) for r in got])
        first = got[0]["metrics"]
        for key in ("extractor", "extractor_weights", "teacher", "teacher_weights", "profile"):
            row[key] = first.get(key)
        rows[variant] = row
    comparisons = [compare(rows, dict(c)) for c in tree["ablations"].get("comparisons") or []]
    return {"rows": list(rows.values()), "comparisons": comparisons}


def _fmt(value, std=None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text + (f" ± {std:.2g}" if std is not None else "")


def _levels(values: list | None, stds: list | None = None) -> str:
    if not values:
        return "-"
    return " / ".join(
        f"{v:.2f}" + (f"±{sd:.2f}" if sd is not None else "") for v, sd in zip(values, stds or [None] * len(values))
    )


def write_table(summary: dict, results: dict[str, dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary["rows"]
    lines = [
        "# Ablations",
        "",
        "Generated by `restok ablate` (or `snakemake ablations`); one row per variant, mean ± std over seeds.",
        "",
    ]
    demo = sorted(
        {
            str(r.get(k))
            for r in rows
            for k in ("extractor", "extractor_weights", "teacher_weights")
            if r.get(k) and "random-init" in str(r.get(k))
        }
    )
    if demo:
        lines += [f"> **Demo numbers, not paper numbers**: produced with random-init weights ({', '.join(demo)}).", ""]
    head = [
        "variant",
        "runs",
        *(label for _, label in COLUMNS),
        *(label for _, label in LEVEL_COLUMNS),
        "extractor",
        "teacher weights",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [
            r["variant"],
            str(r["runs"]),
            *(_fmt(r[k], r[f"{k}_std"]) for k, _ in COLUMNS),
            *(_levels(r[k], r[f"{k}_std"]) for k, _ in LEVEL_COLUMNS),
            str(r.get("extractor")),
            str(r.get("teacher_weights")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## The paper's claims (declared in params `ablations.comparisons`)",
        "",
        "difference = variant - versus (means over seeds); spread = sqrt(std_variant² + std_versus²). "
        "**agree** / **disagree**: the difference is larger than the spread, in / against the paper's "
        "direction; **cannot tell**: within the spread (or one seed: no spread). Per-level metrics are judged "
        "level by level.",
        "",
        "| claim | variant vs versus | metric | expected | variant | versus | difference | spread | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in summary["comparisons"]:
        cells = []
        for k in ("variant", "versus", "difference", "spread"):
            got = [v[k] for v in c["values"]]
            cells.append("-" if not got or None in got else _levels(got) if c["per_level"] else _fmt(got[0]))
        lines.append(
            f"| {c['claim']} | {c['variant']} vs {c['versus']} | {c['metric']} | {c.get('expect') or '-'} | "
            + " | ".join(cells)
            + f" | {c['verdict']} |"
        )
    lines += [
        "",
        "![headline metrics per variant](ablations.png)",
        "",
        "![samples per variant](ablations_grids.png)",
        "",
    ]
    (out_dir / "ablations.md").write_text("\n".join(lines))
    (out_dir / "ablations.json").write_text(json.dumps(summary, indent=2) + "\n")
    _figures(rows, results, out_dir)


def _figures(rows: list[dict], results: dict[str, dict], out_dir: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("gFID", "rFID")):
        vals = [r[key] if r[key] is not None else float("nan") for r in rows]
        errs = [r[f"{key}_std"] or 0.0 for r in rows]
        ax.bar(range(len(names)), vals, yerr=errs, color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{key} per variant (lower is better)")
    fig.tight_layout()
    fig.savefig(out_dir / "ablations.png", dpi=110)
    plt.close(fig)

    grids = [
        (
            r["variant"],
            next((v["grid"] for run, v in results.items() if variant_of(run) == r["variant"] and v.get("grid")), None),
        )
        for r in rows
    ]
    grids = [(n, Image.open(io.BytesIO(g))) for n, g in grids if g]
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(3 * len(grids), 3.4), squeeze=False)
        for ax, (name, img) in zip(axes[0], grids):
            ax.imshow(img)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out_dir / "ablations_grids.png", dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="restok ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("action", nargs="?", default="run", choices=("run", "table", "params"))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--results", default="results", help="where ablations.{md,json,png} go")
    ap.add_argument(
        "--from",
        dest="source",
        default="dvc",
        choices=("dvc", "files"),
        help="table: read DVC experiments, or the Snakemake layout",
    )
    ap.add_argument("--run", help="params: the run whose params file to write")
    ap.add_argument("--out", help="params: where to write it")
    ap.add_argument("--dry", action="store_true", help="run: print the dvc commands only")
    args = ap.parse_args(argv)
    try:
        tree = read_yaml(args.params)
        validate(tree, args.params)
    except ParamsError as e:
        print(f"restok: {e}", file=sys.stderr)
        return 2
    if args.action == "params":
        all_runs = runs(tree)
        if args.run not in all_runs:
            print(f"restok: no ablation run {args.run!r}; known: {sorted(all_runs)}", file=sys.stderr)
            return 2
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # jobs of one run may write it at the same time
        tmp.write_text(yaml.safe_dump(all_runs[args.run], sort_keys=False))
        tmp.replace(out)
        return 0
    if args.action == "run":
        run_dvc(tree, args.dry)
        if args.dry:
            return 0
    results = collect_dvc(tree) if args.source == "dvc" else collect_files(tree, Graph())
    if not results:
        print("restok: no finished ablation runs found", file=sys.stderr)
        return 1
    write_table(summarise(tree, results), results, Path(args.results))
    print(f"wrote {Path(args.results) / 'ablations.md'} ({len(results)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
