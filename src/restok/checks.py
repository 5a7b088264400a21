"""Self-checks of a run: the profile's targets (params `checks`) held against the run's headline metrics.

`score` calls `evaluate(p.checks, headline)` and writes the list into results/metrics.json (`checks`) and, first of
all, into results/README.md (`markdown`), so that a reader sees at once whether this run learned anything:

- tokenizer: val PSNR at least `psnr_above_class_mean_db` above predicting each image's class-mean image (a code
  that only records the class reaches the baseline); per-position code entropy above `min_position_entropy_bits` at
  every level (no level is a constant);
- generator: the class probe recognises the conditioning class in at least `probe_sample_accuracy` of the samples,
  and the probe itself is right on at least `probe_val_accuracy` of the real val images; gFID at most
  `gfid_over_rfid` times the rFID on the same number of images, and at most `gfid_over_untrained` times the gFID of
  an untrained generator of the same config, sampled and scored the same way in the same run.

A check is {name, value, baseline, threshold, target, pass, reason}. A metric the run did not produce (a stage or
feature that is off, an older upstream result) fails its check as missing, with the reason; it never raises.
A null target switches its check off (it is not listed).
"""

from __future__ import annotations

import math

from restok.config.evaluation import Checks


def _number(head: dict, key: str):
    """head[key] as a float, or None when absent or not a finite number."""
    value = head.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _check(name: str, target: str, head: dict, keys: tuple[str, ...], rule) -> dict:
    """One check: `rule(*values)` -> (value, baseline, threshold, pass, reason) once every key is a number."""
    values = [_number(head, key) for key in keys]
    missing = [key for key, value in zip(keys, values) if value is None]
    out = {"name": name, "target": target, "value": values[0], "baseline": None, "threshold": None}
    if missing:
        return {**out, "pass": False, "reason": f"missing: {', '.join(missing)} not in the run's metrics"}
    value, baseline, threshold, passed, reason = rule(*values)
    return {**out, "value": value, "baseline": baseline, "threshold": threshold, "pass": bool(passed), "reason": reason}


def _entropy_check(head: dict, minimum: float) -> dict:
    name, key = "every level carries information", "code_position_entropy_bits"
    target = f"per-position code entropy > {minimum:g} bits at every level (val codes)"
    levels = head.get(key)
    levels = [_number({key: v}, key) for v in levels] if isinstance(levels, list) else []
    out = {"name": name, "target": target, "value": None, "baseline": None, "threshold": minimum}
    if not levels or None in levels:
        return {**out, "pass": False, "reason": f"missing: {key} (a list per level) not in the run's metrics"}
    flat = [i for i, v in enumerate(levels) if v <= minimum]
    return {
        **out,
        "value": min(levels),
        "levels": levels,
        "pass": not flat,
        "reason": f"level(s) {flat} at or below {minimum:g} bits" if flat else None,
    }


def evaluate(targets: Checks, head: dict) -> list[dict]:
    """The enabled checks of `targets` on the headline metrics `head` (results/metrics.json), in a fixed order."""
    out = []
    if (margin := targets.psnr_above_class_mean_db) is not None:
        out.append(
            _check(
                "tokenizer beats the class-mean image",
                f"PSNR_dB >= PSNR_class_mean_dB + {margin:g} dB",
                head,
                ("PSNR_dB", "PSNR_class_mean_dB"),
                lambda psnr, base: (psnr, base, base + margin, psnr >= base + margin, None),
            )
        )
    if (minimum := targets.min_position_entropy_bits) is not None:
        out.append(_entropy_check(head, minimum))
    for key, what in (
        ("probe_sample_accuracy", "samples show the class they were conditioned on"),
        ("probe_val_accuracy", "the class probe is right on real val images"),
    ):
        if (least := getattr(targets, key)) is not None:
            out.append(
                _check(
                    what,
                    f"{key} >= {least:g}",
                    head,
                    (key,),
                    lambda acc, least=least: (acc, None, least, acc >= least, None),
                )
            )
    if (ratio := targets.gfid_over_rfid) is not None:  # FID depends on the count: score paired them (same n)
        out.append(
            _check(
                "generator close to its tokenizer",
                f"gFID <= {ratio:g} x rFID (same number of images)",
                head,
                ("gFID_paired", "rFID_paired"),
                lambda gfid, rfid: (gfid, rfid, ratio * rfid, gfid <= ratio * rfid, None),
            )
        )
    if (ratio := targets.gfid_over_untrained) is not None:
        out.append(
            _check(
                "generator far better than untrained",
                f"gFID <= {ratio:g} x gFID of an untrained generator",
                head,
                ("gFID", "gFID_untrained_generator"),
                lambda gfid, base: (gfid, base, ratio * base, gfid <= ratio * base, None),
            )
        )
    return out


def split(checks: list[dict]) -> tuple[dict, dict]:
    """(numbers of each check by name: value, baseline, threshold, pass (and levels); the rest: target, reason), for
    results/metrics.json and its provenance.json."""
    numbers = {
        c["name"]: {k: c[k] for k in ("value", "baseline", "threshold", "pass", "levels") if k in c} for c in checks
    }
    return numbers, {c["name"]: {"target": c["target"], "reason": c["reason"]} for c in checks}


def markdown(checks: list[dict]) -> list[str]:
    """README lines: a one-line verdict and a table (check, value, baseline, threshold, target, result)."""

    def fmt(v):
        return "-" if v is None else f"{v:.4g}"

    passed = sum(c["pass"] for c in checks)
    lines = [
        "## Did this run learn? (checks)",
        "",
        f"**{passed} of {len(checks)} checks pass.** Targets: params `checks`; values: `metrics.json`.",
        "",
        "| check | value | baseline | threshold | target | result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in checks:
        result = "pass" if c["pass"] else "**FAIL**" + (f" ({c['reason']})" if c["reason"] else "")
        value = " / ".join(f"{v:.3g}" for v in c["levels"]) if c.get("levels") else fmt(c["value"])
        lines.append(
            f"| {c['name']} | {value} | {fmt(c['baseline'])} | {fmt(c['threshold'])} | {c['target']} | {result} |"
        )
    return lines + [""]
