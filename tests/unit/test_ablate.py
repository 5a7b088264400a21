"""The ablation grid: runs from params, which stages each run recomputes, redirected commands, the table."""

from __future__ import annotations

import ast
import json
import re
import shlex
from types import SimpleNamespace

import pytest
import yaml
from snakemake.utils import format as snakemake_format

from restok import ablate
from restok.config.engine import REPO, ParamsError
from restok.config.load import load_params
from restok.config.profiles import profile_tree


@pytest.fixture(scope="module")
def graph():
    return ablate.Graph(REPO / "dvc.yaml")


def one_seed() -> dict:
    """The default profile with one seed per variant: run names are the variant names."""
    tree = profile_tree("default")
    tree["ablations"]["seeds"] = 1
    return tree


def test_runs_and_seeds():
    assert set(ablate.runs(one_seed())) == set(one_seed()["ablations"]["variants"])
    tree = profile_tree("default")
    assert tree["ablations"]["seeds"] == 3
    runs = ablate.runs(tree)
    assert {ablate.variant_of(r) for r in runs} == set(tree["ablations"]["variants"])
    seeds = {runs[f"restok-s{k}"]["train_generator"]["loop"]["seed"] for k in range(3)}
    assert len(seeds) == 3


def test_a_run_recomputes_exactly_what_its_overrides_touch(graph):
    tree = one_seed()
    runs = ablate.runs(tree)
    assert graph.own(tree, runs["restok"]) == set()
    for run, run_tree in runs.items():
        own = graph.own(tree, run_tree)
        for name, st in graph.stages.items():
            touched = any(tree.get(s) != run_tree.get(s) for s in st.params)
            upstream_own = own.intersection(graph.upstream(name))
            assert (name in own) == bool(touched or upstream_own), (run, name)
    if "train_tokenizer" in graph.stages:
        ar = graph.own(tree, runs["plain_ar"])
        assert "train_tokenizer" not in ar and "extract_latents" not in ar and "train_generator" in ar
        assert "train_tokenizer" in graph.own(tree, runs["no_residual_latents"])


def test_commands_redirect_only_recomputed_artifacts(graph):
    tree = one_seed()
    run_tree = ablate.runs(tree)["plain_ar"]
    own = graph.own(tree, run_tree)
    for name, st in graph.stages.items():
        cmd = graph.command(name, "plain_ar", own)
        if name in own:
            assert "--params data/ablations/plain_ar/params.yaml" in cmd
        for dep in st.deps:
            producer = graph.producer(dep)
            if producer and producer != name and dep in st.cmd.split():
                expect = dep if producer not in own else graph.path(dep, "plain_ar", own)
                assert f" {expect}" in cmd, (name, dep, cmd)


def test_variant_rules_quote_every_value_they_substitute(graph):
    """Behind the name check in params validation: the variant rules' shell command keeps a run name that a shell
    would read as code one plain word (formatted as Snakemake formats it, then split as a shell splits it)."""
    text = (REPO / "workflow/rules/ablations.smk").read_text()
    template = ast.literal_eval("(" + re.search(r"\n        shell:\n((?:\s*#.*\n)*(?:\s+\".*\"\n)+)", text)[1] + ")")
    run = "x$(touch /tmp/pwn)"
    cmd = snakemake_format(
        template,
        wildcards=SimpleNamespace(run=run),
        log=f"logs/ablations/{run}/shard.log",
        resources=SimpleNamespace(gpus_per_node=0, nodes=1),
        params=SimpleNamespace(cmd=graph.command("shard", run, {"shard"})),
    )
    words = shlex.split(cmd)
    assert words[words.index("--run") + 1] == run
    assert f"data/ablations/{run}/params.yaml" in words and f"data/ablations/{run}/shard" in words
    assert words[words.index(">") + 1] == f"logs/ablations/{run}/shard.log"


def test_dvc_queue_commands_set_exactly_the_overrides():
    tree = one_seed()
    cmds = {c[5]: c[6:] for c in ablate.dvc_queue_commands(tree)}
    assert cmds["abl-restok"] == [ablate.TARGET]
    assert cmds["abl-plain_ar"] == [
        "-S",
        "generator.mode=ar",
        "-S",
        "sample.sampling.cfg_schedule=constant",
        ablate.TARGET,
    ]
    assert cmds["abl-no_vf_alignment"] == ["-S", "tokenizer.vf_align=false", ablate.TARGET]


class Experiments:
    """`dvc.api.exp_show` rows as DVC 3.6x returns them (trimmed: the workspace, the baseline commit, then one row
    per experiment with its State) and the experiment commits' params.yaml that `git show` reads."""

    def __init__(self, monkeypatch, baseline: dict, exps: list[tuple[str, str | None, dict]]):
        import dvc.api

        self.rows = [
            {"Experiment": None, "rev": "workspace", "typ": "baseline", "State": None},
            {"Experiment": None, "rev": "main", "typ": "baseline", "State": None},
        ]
        self.params = {"main": baseline}
        for i, (name, state, params) in enumerate(exps):
            rev = f"{i:07x}"
            self.rows.append({"Experiment": name, "rev": rev, "typ": "branch_commit", "State": state})
            self.params[rev] = params
        self.calls = []
        monkeypatch.setattr(dvc.api, "exp_show", lambda: self.rows)
        monkeypatch.setattr(ablate, "_sh", self.sh)

    def sh(self, cmd, capture=False, env=None):
        self.calls.append(cmd)
        if cmd[:2] == ["git", "show"]:
            return yaml.safe_dump(self.params[cmd[2].split(":")[0]])
        return ""


def test_rerun_plans_nothing_and_a_changed_param_replans_only_what_it_changes(monkeypatch, capsys):
    tree = one_seed()
    all_runs = ablate.runs(tree)
    Experiments(monkeypatch, tree, [(ablate.PREFIX + r, None, t) for r, t in all_runs.items()])
    finished = ablate.finished_experiments()
    assert set(finished) == set(all_runs)
    assert ablate.plan(tree, finished) == (list(all_runs), [], [])

    # queued, running and failed experiments are listed but are not results
    Experiments(
        monkeypatch, tree, [(ablate.PREFIX + "restok", s, all_runs["restok"]) for s in ("Queued", "Running", "Failed")]
    )
    assert ablate.finished_experiments() == {}

    # a switch changed by hand in one variant: only that run is stale
    tree["ablations"]["variants"]["plain_ar"] = {"generator.mode": "ar", "sample.sampling.top_k": 8}
    fresh, stale, missing = ablate.plan(tree, finished)
    assert stale == ["plain_ar"] and missing == [] and "plain_ar" not in fresh


def test_run_dvc_queues_only_missing_and_stale_runs(monkeypatch, capsys):
    tree = one_seed()
    all_runs = ablate.runs(tree)
    stale_tree = json.loads(json.dumps(all_runs["plain_ar"]))
    stale_tree["sample"]["sampling"]["top_k"] = 3
    done = [(ablate.PREFIX + r, "Success", t) for r, t in all_runs.items() if r not in ("plain_ar", "flat_queries")]
    exps = Experiments(monkeypatch, tree, done + [(ablate.PREFIX + "plain_ar", "Success", stale_tree)])
    ablate.run_dvc(tree, dry=False)
    calls = [c for c in exps.calls if c[:2] != ["git", "show"]]
    assert calls[0] == ["dvc", "exp", "remove", ablate.PREFIX + "plain_ar"]
    assert sorted(c[5] for c in calls if c[:4] == ["dvc", "exp", "run", "--queue"]) == [
        ablate.PREFIX + "flat_queries",
        ablate.PREFIX + "plain_ar",
    ]
    assert calls[-1] == ["dvc", "exp", "run", "--run-all", "-j", str(tree["ablations"]["jobs"])]

    exps = Experiments(monkeypatch, tree, [(ablate.PREFIX + r, "Success", t) for r, t in all_runs.items()])
    ablate.run_dvc(tree, dry=False)
    assert all(c[:2] == ["git", "show"] for c in exps.calls)
    assert "nothing to run" in capsys.readouterr().out


def _records(tree: dict, gfid: dict, entropy: dict | None = None, spread: float = 1.0) -> dict[str, dict]:
    """Synthetic finished runs: gFID per variant (+ spread x seed offset), per-level entropy, one grid-free run each."""
    results = {}
    for run in ablate.runs(tree):
        variant = ablate.variant_of(run)
        seed = int(run.rsplit("-s", 1)[1]) if run != variant else 1
        offset = spread * (seed - 1)  # seeds 0, 1, 2 -> -spread, 0, +spread: std = spread
        steps = 32 if variant == "plain_ar" else 7
        levels = [e + offset / 10 for e in (entropy or {}).get(variant, [1.0, 2.0])]
        results[run] = {
            "metrics": {
                "gFID": gfid.get(variant, 12.0) + offset,
                "rFID": 5.0,
                "sampling_steps": steps,
                "code_position_entropy_bits": levels,
                "extractor": "inception-v3-compat-random-init",
                "teacher_weights": "random-init(seed=0)",
            },
            "scores": {},
            "grid": None,
        }
    return results


def test_verdict_rule():
    assert ablate.verdict(-3.0, 1.0, "lower") == "agree" and ablate.verdict(3.0, 1.0, "lower") == "disagree"
    assert ablate.verdict(3.0, 1.0, "higher") == "agree"
    assert ablate.verdict(-1.0, 1.0, "lower") == "cannot tell (difference within the spread)"
    assert ablate.verdict(-9.0, None, "lower") == "cannot tell (one run per variant: no spread)"
    assert ablate.verdict(2.0, 1.0, None) == "differs (no stated direction)"


def test_table_judges_the_declared_claims_over_three_seeds(tmp_path):
    tree = profile_tree("default")  # 3 seeds; comparisons declared in params
    results = _records(
        tree,
        gfid={
            "restok": 8.0,
            "no_vf_alignment": 14.0,
            "no_residual_image_tokens": 9.0,
            "har_constant_cfg": 10.0,
            "plain_ar": 10.5,
        },
        entropy={"restok": [1.0, 3.0], "no_residual_latents": [0.2, 2.9]},
    )
    summary = ablate.summarise(tree, results)
    rows = {r["variant"]: r for r in summary["rows"]}
    assert rows["restok"]["runs"] == 3 and rows["restok"]["gFID"] == 8.0 and rows["restok"]["gFID_std"] == 1.0
    assert rows["restok"]["code_position_entropy_bits"] == pytest.approx([1.0, 3.0])
    assert rows["restok"]["code_position_entropy_bits_std"] == pytest.approx([0.1, 0.1])
    claims = {(c["variant"], c["versus"], c["metric"]): c for c in summary["comparisons"]}
    assert len(claims) == len(tree["ablations"]["comparisons"])
    vf = claims[("restok", "no_vf_alignment", "gFID")]
    assert vf["verdict"] == "agree" and vf["values"][0]["difference"] == -6.0
    assert vf["values"][0]["spread"] == pytest.approx(2**0.5)
    assert claims[("restok", "no_residual_image_tokens", "gFID")]["verdict"].startswith("cannot tell")
    assert claims[("har_constant_cfg", "plain_ar", "gFID")]["verdict"].startswith("cannot tell")
    assert claims[("har_constant_cfg", "plain_ar", "sampling_steps")]["verdict"] == "agree"  # 7 vs 32, no spread
    entropy = claims[("restok", "no_residual_latents", "code_position_entropy_bits")]
    assert entropy["per_level"] and [v["difference"] for v in entropy["values"]] == pytest.approx([0.8, 0.1])
    assert entropy["verdict"] == (
        "per level: 0: differs (no stated direction); 1: cannot tell (difference within the spread)"
    )
    missing = claims[("har_constant_cfg", "plain_ar", "probe_sample_accuracy")]
    assert missing["verdict"] == "missing: no probe_sample_accuracy from finished runs of har_constant_cfg, plain_ar"

    ablate.write_table(summary, results, tmp_path)
    md = (tmp_path / "ablations.md").read_text()
    assert "Demo numbers, not paper numbers" in md and "| plain_ar | 3 |" in md
    assert (
        "| VF alignment improves generation | restok vs no_vf_alignment | gFID | lower | 8 | 14 | -6 | 1.414 "
        "| agree |" in md
    )
    assert "1.00±0.10 / 3.00±0.10" in md  # per-level entropy with its spread
    assert json.loads((tmp_path / "ablations.json").read_text())["comparisons"]
    assert (tmp_path / "ablations.png").stat().st_size > 0


def test_comparisons_are_validated_against_the_variants(tmp_path):
    tree = profile_tree("default")
    tree["ablations"]["comparisons"].append(
        {"claim": "x", "variant": "restok", "versus": "no_such_variant", "metric": "gFID", "expect": "lower"}
    )
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    last = len(tree["ablations"]["comparisons"]) - 1
    message = rf"ablations.comparisons\[{last}\].versus='no_such_variant' is not a variant"
    with pytest.raises(ParamsError, match=message):
        load_params(path, ("ablations",))
    tree["ablations"]["comparisons"][-1].update(versus="plain_ar", metric="FID")
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ParamsError, match="metric"):
        load_params(path, ("ablations",))


def test_one_seed_cannot_tell(tmp_path):
    tree = one_seed()
    summary = ablate.summarise(tree, _records(tree, gfid={"restok": 8.0, "no_vf_alignment": 14.0}))
    vf = next(c for c in summary["comparisons"] if c["versus"] == "no_vf_alignment")
    assert vf["verdict"] == "cannot tell (one run per variant: no spread)"
