"""Our benchmarks and the official code's on the same CUDA machine, one after the other, and the ratios against our targets.

    python benchmarks/side_by_side.py --official official/          # one CUDA GPU; writes benchmarks/results/side_by_side/

`--official` is the official ResTok work tree (Kwai-Kolors/ResTok e0059cb), exported as
benchmarks/README.md says (an untracked folder in the checkout travels to a device machine). The
parts run as separate processes, so each starts with empty GPU memory:

  tokenizer        benchmarks/tokenizer.py, ResTok-L at 256 px, batch 16, eager and regionally compiled
  tokenizer_ckpt   the same at batch 32 with `loop.checkpointing: all` (batch 32 does not fit without it)
  generator        benchmarks/generator.py, HAR GPT-L, train batch 32, sample batch 50, bf16, eager and compiled
                   (sampling compiled as `sample.compile` runs it: CUDA graphs over the static KV cache)
  generator_b256   the same training at batch 256 (the ImageNet recipe's global batch on one GPU), no sampling
  official         bench_official.py --size l: the official code, eager, same definitions

Each part writes `<part>.json` into --out; the table at the end is read from whatever JSON files are there, so
`--parts` can split the run over several calls (e.g. `--parts official`, then `--parts tokenizer,generator`). The
ratios are ours / official on this machine, each against its target: tokenizer training 3x, generator
training 4x, sampling 5x. Without CUDA the script stops before running anything.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_COMMIT = "e0059cbae1858a9da66e4ba32d4db686a5db4996"
HARNESS = "bench-official/bench_official.py"  # in shared/, beside the checkout or inside it
TARGETS = {"tokenizer train": 3.0, "generator train": 4.0, "sampling": 5.0}  # our targets (ours / official)


def commands(official: Path, harness: Path, out: Path) -> dict[str, list[str]]:
    py = sys.executable

    def generator(part: str, batch: str, *extra: str) -> list[str]:
        return [
            py,
            str(REPO / "benchmarks/generator.py"),
            "--device",
            "cuda",
            "--size",
            "har-L",
            "--batch",
            batch,
            *extra,
            "--dtype",
            "bf16",
            "--compile",
            "--json",
            str(out / f"{part}.json"),
        ]

    return {
        "tokenizer": [
            py,
            str(REPO / "benchmarks/tokenizer.py"),
            "--device",
            "cuda",
            "--size",
            "L",
            "--batch",
            "16",
            "--compile",
            "--json",
            str(out / "tokenizer.json"),
        ],
        "tokenizer_ckpt": [
            py,
            str(REPO / "benchmarks/tokenizer.py"),
            "--device",
            "cuda",
            "--size",
            "L",
            "--batch",
            "32",
            "--compile",
            "--checkpointing",
            "all",
            "--json",
            str(out / "tokenizer_ckpt.json"),
        ],
        "generator": generator("generator", "32"),
        "generator_b256": generator("generator_b256", "256", "--sample-batch", "0"),
        "official": [
            py,
            str(harness),
            "--repo",
            str(official),
            "--device",
            "cuda",
            "--size",
            "l",
            "--official-commit",
            OFFICIAL_COMMIT,
            "--out",
            str(out / "official.json"),
        ],
    }


def table(results: dict[str, dict]) -> list[tuple[str, str, float | None, float | None]]:
    """(figure, our configuration, ours, official) rows from the parts' JSON files; None where a part is missing."""
    official = results.get("official", {}).get("summary", {})
    rows = []
    for part in ("tokenizer", "tokenizer_ckpt"):
        for r in results.get(part, {}).get("rows", []):
            label = f"batch {r['batch']}, {'compiled' if r['compile'] else 'eager'}, checkpointing {r['checkpointing']}"
            ours = None if r.get("oom") else r["train_images_per_s"]
            rows.append(("tokenizer train img/s", label, ours, official.get("tok_train_images_per_s")))
            for kind in ("encode", "decode"):
                ours = None if r.get("oom") else r[f"{kind}_images_per_s"]
                rows.append((f"tokenizer {kind} img/s", label, ours, official.get(f"tok_{kind}_images_per_s")))
    for part in ("generator", "generator_b256"):
        gen = results.get(part, {})
        for path, r in gen.get("rows", {}).items():
            label = f"batch {gen['batch']}, {path}, {gen['dtype']}"
            ours = None if r.get("oom") else r["seq_per_s"]
            rows.append(("generator train seq/s", label, ours, official.get("gpt_train_sequences_per_s")))
            if "img_per_s" in r:
                rows.append(
                    (
                        "sampling img/s",
                        f"batch {gen['sample_batch']}, {path}, {gen['dtype']}",
                        r["img_per_s"],
                        official.get(f"har_sample_{gen['dtype']}_images_per_s"),
                    )
                )
    return rows


def report(results: dict[str, dict]) -> str:
    lines = [f"{'figure':24} {'ours':>9} {'official':>9} {'ratio':>7} {'target':>7}  our configuration"]
    for figure, label, ours, ref in table(results):
        ratio = ours / ref if ours is not None and ref else None
        target = next((t for name, t in TARGETS.items() if figure.startswith(name)), None)
        cells = [f"{v:9.1f}" if v is not None else f"{'-':>9}" for v in (ours, ref)]
        lines.append(
            f"{figure:24} {cells[0]} {cells[1]} {f'x{ratio:.2f}' if ratio else '-':>7} "
            f"{f'x{target:.0f}' if target else '':>7}  {label}"
        )
    for part in ("tokenizer", "tokenizer_ckpt", "generator", "generator_b256"):
        rows = results.get(part, {}).get("rows", [])
        for name, row in rows.items() if isinstance(rows, dict) else enumerate(rows):
            for key, what in (("attention_kernels", "train"), ("sample_attention_kernels", "sample")):
                if key in row:
                    kernels = row[key]
                    verdict = "UNFUSED" if any(k.endswith("_math") for k in kernels) else "fused"
                    lines.append(
                        f"attention {verdict:8} {part} {name} {what} {', '.join(kernels) or 'none seen (compiled)'}"
                    )
    devices = {r.get("device") or r.get("env", {}).get("gpu") for r in results.values()}
    lines.append(f"devices: {', '.join(sorted(str(d) for d in devices))} (compare only figures from one machine)")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, default=REPO / "official", help="exported official work tree")
    ap.add_argument("--harness", type=Path, default=None, help=f"bench_official.py (default: shared/{HARNESS})")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/side_by_side")
    ap.add_argument(
        "--parts",
        default="tokenizer,tokenizer_ckpt,generator,generator_b256,official",
        help="comma-separated subset of the parts to run now; the report uses every JSON in --out",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/side_by_side.py measures GPU throughput and needs a CUDA device; none is "
            "available here. Run it on a CUDA machine (see README, Benchmarks)."
        )
    harness = args.harness or next(
        (p for p in (REPO / "shared" / HARNESS, REPO.parent / "shared" / HARNESS) if p.is_file()),
        REPO.parent / "shared" / HARNESS,
    )
    parts = args.parts.split(",")
    cmds = commands(args.official, harness, args.out)
    if unknown := sorted(set(parts) - set(cmds)):
        raise SystemExit(f"--parts: unknown {unknown}; choose from {sorted(cmds)}")
    if "official" in parts and not (args.official / "modeling").is_dir():
        raise SystemExit(
            f"--official {args.official}: not the official work tree (no modeling/); export it as "
            f"{harness.parent / 'README.md'} says"
        )
    if "official" in parts and not harness.is_file():
        raise SystemExit(f"{harness}: the official harness is missing; pass --harness")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for part in parts:
        print(f"== {part}: {' '.join(cmds[part])}", flush=True)
        (args.out / f"{part}.json").unlink(missing_ok=True)  # never report an earlier run's figures as this one's
        if subprocess.run(cmds[part], cwd=REPO).returncode:
            failed.append(part)
    results = {p.stem: json.loads(p.read_text()) for p in sorted(args.out.glob("*.json")) if p.stem in cmds}
    print(report(results))
    if failed:
        raise SystemExit(f"failed parts: {', '.join(failed)}")


if __name__ == "__main__":
    main()
