"""The run's self-checks (restok.checks): each target against headline metrics, missing metrics, the README table.

Run: .venv/bin/python -m pytest tests/unit/test_checks.py -q
The headline dicts are written by hand: the checks are pure functions of results/metrics.json and the params.
"""

import dataclasses

import pytest

from restok import checks
from restok.config.evaluation import Checks

LEARNED = {
    "PSNR_dB": 29.5,
    "PSNR_class_mean_dB": 25.2,
    "code_position_entropy_bits": [0.4, 1.2, 2.5],
    "probe_sample_accuracy": 0.93,
    "probe_val_accuracy": 0.99,
    "gFID": 9.0,
    "rFID": 5.0,
    "gFID_paired": 9.0,
    "rFID_paired": 5.0,
    "gFID_untrained_generator": 120.0,
}
# a committed run that collapsed: class means beat the tokenizer, constant coarse levels, gFID ~ rFID
COLLAPSED = {
    **LEARNED,
    "PSNR_dB": 16.3,
    "code_position_entropy_bits": [0.0, 0.0, 3.6],
    "probe_sample_accuracy": 0.565,
    "gFID": 5.7,
    "rFID": 5.5,
    "gFID_paired": 5.7,
    "rFID_paired": 5.5,
    "gFID_untrained_generator": 6.0,
}


def by_name(result: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in result}


def test_a_run_that_learned_passes_every_check():
    result = checks.evaluate(Checks(), LEARNED)
    assert len(result) == 6 and all(c["pass"] and c["reason"] is None for c in result)
    psnr = by_name(result)["tokenizer beats the class-mean image"]
    assert (psnr["value"], psnr["baseline"], psnr["threshold"]) == (29.5, 25.2, pytest.approx(29.2))
    untrained = by_name(result)["generator far better than untrained"]
    assert (untrained["baseline"], untrained["threshold"]) == (120.0, 60.0)


def test_the_collapsed_run_fails_what_was_found():
    result = by_name(checks.evaluate(Checks(), COLLAPSED))
    failed = {name for name, c in result.items() if not c["pass"]}
    assert failed == {
        "tokenizer beats the class-mean image",
        "every level carries information",
        "samples show the class they were conditioned on",
        "generator far better than untrained",
    }
    entropy = result["every level carries information"]
    assert entropy["value"] == 0.0 and entropy["reason"] == "level(s) [0, 1] at or below 0 bits"
    assert result["generator close to its tokenizer"]["pass"]  # gFID ~ rFID alone says nothing: hence the others


@pytest.mark.parametrize("boundary", [True, False])
def test_thresholds_are_inclusive_except_entropy(boundary):
    head = {
        **LEARNED,
        "PSNR_dB": 29.2 if boundary else 29.19,
        "probe_sample_accuracy": 0.9 if boundary else 0.89,
        "gFID_paired": 10.0 if boundary else 10.01,
        "code_position_entropy_bits": [0.0 if boundary else 0.01, 1.0],
    }
    result = by_name(checks.evaluate(dataclasses.replace(Checks(), psnr_above_class_mean_db=4.0), head))
    assert result["samples show the class they were conditioned on"]["pass"] is boundary
    assert result["generator close to its tokenizer"]["pass"] is boundary
    assert result["every level carries information"]["pass"] is not boundary  # strictly above 0 bits


def test_missing_metrics_fail_with_a_reason_and_never_raise():
    result = checks.evaluate(
        Checks(),
        {"PSNR_dB": 20.0, "gFID_paired": float("nan"), "rFID_paired": None, "code_position_entropy_bits": None},
    )
    assert len(result) == 6 and not any(c["pass"] for c in result)
    reasons = [c["reason"] for c in result]
    assert reasons[0] == "missing: PSNR_class_mean_dB not in the run's metrics"
    assert reasons[1].startswith("missing: code_position_entropy_bits")
    assert reasons[4] == "missing: gFID_paired, rFID_paired not in the run's metrics"
    assert checks.evaluate(Checks(), {})[2]["value"] is None


def test_gfid_against_rfid_compares_the_paired_values():
    # the headline FIDs may be on different counts (500 samples, 359 val images); the check reads the paired ones
    head = {**LEARNED, "gFID": 30.0, "rFID": 5.0, "gFID_paired": 9.5, "rFID_paired": 5.0}
    c = by_name(checks.evaluate(Checks(), head))["generator close to its tokenizer"]
    assert c["pass"] and (c["value"], c["baseline"], c["threshold"]) == (9.5, 5.0, 10.0)


def test_null_targets_switch_checks_off():
    off = Checks(probe_sample_accuracy=None, probe_val_accuracy=None, gfid_over_untrained=None)
    assert [c["name"] for c in checks.evaluate(off, {})] == [
        "tokenizer beats the class-mean image",
        "every level carries information",
        "generator close to its tokenizer",
    ]


def test_markdown_leads_with_the_verdict():
    lines = checks.markdown(checks.evaluate(Checks(), COLLAPSED))
    assert lines[2] == "**2 of 6 checks pass.** Targets: params `checks`; values: `metrics.json`."
    row = next(line for line in lines if line.startswith("| every level"))
    assert "0 / 0 / 3.6" in row and "**FAIL** (level(s) [0, 1] at or below 0 bits)" in row
    assert "| tokenizer beats the class-mean image | 16.3 | 25.2 | 29.2 |" in "\n".join(lines)
