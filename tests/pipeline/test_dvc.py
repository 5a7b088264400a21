"""`dvc repro` on the smoke profile: builds, is a no-op the second time, reruns exactly what a param or a code
edit touches."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import yaml

from restok import ablate, deps
from restok.provenance import read_results

from .conftest import BIN, run
from .test_graphs import dvc_graph


def changed_stages(ws) -> set[str]:
    out = json.loads(run(["dvc", "status", "--json"], ws).stdout or "{}")
    return {name.split(":")[-1] for name in out}


def perturb_first_leaf(tree: dict) -> dict:
    """A copy of `tree` with its first leaf changed (type kept where it matters to nobody but DVC's hash)."""
    out = dict(tree)
    key, value = next(iter(out.items()))
    if isinstance(value, dict):
        out[key] = perturb_first_leaf(value)
    elif isinstance(value, bool):
        out[key] = not value
    elif isinstance(value, (int, float)):
        out[key] = value + 1
    else:
        out[key] = f"{value}-changed"
    return out


def test_repro_builds_then_is_a_noop(smoke_ws):
    run(["dvc", "repro"], smoke_ws)
    manifest = json.loads((smoke_ws / "data/shard/train/manifest.json").read_text())
    assert manifest["num_samples"] == 4 * 12 and manifest["class_histogram"] == [12] * 4
    assert (smoke_ws / "results/shard/samples.png").stat().st_size > 0
    again = run(["dvc", "repro"], smoke_ws)
    assert "Data and pipelines are up to date" in again.stdout + again.stderr
    assert changed_stages(smoke_ws) == set()


def test_every_stage_but_score_is_restored_from_the_run_cache(smoke_ws):
    """What the ablation variants rely on: a stage whose command, deps and params match an earlier run is restored
    from DVC's run-cache, not rerun. Without dvc.lock every stage looks new; DVC must then restore all of them but
    score, whose uncached outs (results/README.md, the tracked provenance) keep it out of the run-cache (dvc.yaml)."""
    lock = smoke_ws / "dvc.lock"
    lock.unlink()
    out = run(["dvc", "repro"], smoke_ws)
    log = out.stdout + out.stderr
    restored = set(re.findall(r"Stage '(\w+)' is cached - skipping run", log))
    ran = set(re.findall(r"Running stage '(\w+)'", log))
    assert ran == {"score"} and restored == set(dvc_graph()) - {"score"}, log[-3000:]
    assert changed_stages(smoke_ws) == set()


def test_a_queued_variant_reuses_the_tokenizer_of_its_seed(smoke_ws):
    """`restok ablate`'s queue, two runs of seed 1: the full method, then a variant that changes only sampling.
    The second must restore the first's tokenizer and generator from the run-cache, not train them again."""
    tree = yaml.safe_load((smoke_ws / "params.yaml").read_text())
    tree["ablations"]["seeds"] = 2
    runs = ablate.runs(tree)
    run("git add -A && git -c user.email=t@t -c user.name=t commit -qm built", smoke_ws)
    for name in ("restok-s1", "har_constant_cfg-s1"):
        run(ablate.dvc_queue_command(name, tree, runs[name]), smoke_ws)
    run(["dvc", "exp", "run", "--run-all", "-j", "1"], smoke_ws)
    first = run(["dvc", "queue", "logs", ablate.PREFIX + "restok-s1"], smoke_ws).stdout
    second = run(["dvc", "queue", "logs", ablate.PREFIX + "har_constant_cfg-s1"], smoke_ws).stdout
    assert "Running stage 'train_tokenizer'" in first, first[-3000:]
    for stage in ("train_tokenizer", "extract_latents", "train_generator"):
        assert f"Stage '{stage}' is cached - skipping run" in second, second[-3000:]
    assert "Running stage 'sample'" in second, second[-3000:]


def test_metrics_are_numbers_only(smoke_ws):
    """`dvc metrics show` (and so `dvc metrics diff`) lists numbers only: strings, hashes and timings live in each
    stage's provenance.json, which is an out but not a metric."""
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], smoke_ws).stdout)
    (workspace,) = shown.values()  # one revision: "workspace" in a git repo, "" without scm (this workspace)
    files = workspace["data"]
    assert "results/metrics.json" in files and not any("provenance" in f for f in files)

    def leaves(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from leaves(value, f"{path}[{i}]")
        else:
            yield path, node

    found = [(p, v) for f, d in files.items() for p, v in leaves(d.get("data", {}), f)]
    assert found and all(v is None or isinstance(v, (int, float)) for _, v in found), [
        (p, v) for p, v in found if not (v is None or isinstance(v, (int, float)))
    ]
    assert not any(p.rsplit(".", 1)[-1] in ("seconds", "train_seconds", "generate_images_per_s") for p, _ in found)


def test_a_code_edit_reruns_exactly_the_stages_that_import_it(smoke_ws):
    """Editing src/restok/metrics.py flags exactly the stages whose modules import it (restok.deps), no other."""
    importers = {stage for stage in dvc_graph() if "src/restok/metrics.py" in deps.stage_deps(stage)}
    assert importers == {"train_tokenizer", "extract_latents", "reference_stats", "score", "cfg_search"}
    path = smoke_ws / "src/restok/metrics.py"
    original = path.read_text()
    try:
        path.write_text(original + "\n# an edit\n")
        assert changed_stages(smoke_ws) == importers
    finally:
        path.write_text(original)
    assert changed_stages(smoke_ws) == set()


def test_a_config_edit_reruns_exactly_the_stages_that_read_it(smoke_ws):
    """A comment in the generator's model config flags the stages that read `generator` or build a generator, not
    `shard`, `cache_features` or `reference_stats`: a stage imports only its own sections' config
    (restok.config.load), and the whole-file check it also runs is no dep of it."""
    readers = {"train_tokenizer", "extract_latents", "train_generator", "sample", "score", "cfg_search"}
    path = smoke_ws / "src/restok/models/generator_config.py"
    original = path.read_text()
    try:
        path.write_text(original + "\n# a comment\n")
        assert changed_stages(smoke_ws) == readers
    finally:
        path.write_text(original)
    assert changed_stages(smoke_ws) == set()


def test_a_param_change_reruns_only_the_stages_that_declare_it(smoke_ws):
    params_path = smoke_ws / "params.yaml"
    original = params_path.read_text()
    tree = yaml.safe_load(original)
    graph = dvc_graph()
    try:
        for section in tree:
            if not isinstance(tree[section], dict):
                continue
            params_path.write_text(yaml.safe_dump({**tree, section: perturb_first_leaf(tree[section])}))
            declaring = {name for name, st in graph.items() if section in st["params"]}
            assert changed_stages(smoke_ws) == declaring, f"changing {section}.* must flag exactly {declaring}"
    finally:
        params_path.write_text(original)
    assert changed_stages(smoke_ws) == set()


def test_kill_9_in_dvc_repro_extract_latents_resumes(smoke_ws, tmp_path):
    """DVC deletes data/extract_latents before rerunning the stage; the progress kept beside it survives, so the
    rerun resumes where the killed one stopped and writes what an uninterrupted run writes."""
    params_path = smoke_ws / "params.yaml"
    original = params_path.read_text()
    tree = yaml.safe_load(original)
    tree["extract_latents"]["batch_size"] = 1  # one image per progress update: a window for the kill
    params_path.write_text(yaml.safe_dump(tree))
    progress = smoke_ws / "data/extract_latents.partial/train/progress.json"
    try:
        victim = subprocess.Popen(
            ["dvc", "repro", "extract_latents"],
            cwd=smoke_ws,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={
                **os.environ,
                "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                "DVC_NO_ANALYTICS": "1",
                "OMP_NUM_THREADS": "1",
            },
        )
        deadline, done = time.time() + 600, 0
        while not done and victim.poll() is None and time.time() < deadline:
            try:
                done = json.loads(progress.read_text())["done"]
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.005)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        done = json.loads(progress.read_text())["done"]
        assert 0 < done < 48, f"killed after {done} of 48 train images"
        run(["dvc", "repro", "extract_latents"], smoke_ws, env={"OMP_NUM_THREADS": "1"})
        resumed = read_results(smoke_ws / "results/extract_latents/summary.json")["splits"]["train"]
        assert resumed["resumed_from"] == done and not progress.parent.parent.exists()
        clean = tmp_path / "clean"
        run(
            [
                "python",
                "-m",
                "restok.stages.extract_latents",
                "--params",
                "params.yaml",
                "--out",
                str(clean / "data"),
                "--results",
                str(clean / "results"),
            ],
            smoke_ws,
            env={"OMP_NUM_THREADS": "1"},
        )
        for split in ("train", "val"):
            for name in ("codes.npy", "labels.npy", "meta.json"):
                assert (smoke_ws / "data/extract_latents" / split / name).read_bytes() == (
                    clean / "data" / split / name
                ).read_bytes(), f"{split}/{name}"
    finally:
        params_path.write_text(original)


def test_changed_resolution_reruns_shard(smoke_ws):
    tree = yaml.safe_load((smoke_ws / "params.yaml").read_text())
    tree["data"]["resolution"] = 64  # the smoke tokenizer needs an 8x8 multiple grid (4x downsampling)
    (smoke_ws / "params.yaml").write_text(yaml.safe_dump(tree))
    assert "shard" in changed_stages(smoke_ws)
    out = run(["dvc", "repro", "shard"], smoke_ws)  # the stage alone: its downstream is covered by the graph tests
    assert "Running stage 'shard'" in out.stdout
    manifest = json.loads((smoke_ws / "data/shard/val/manifest.json").read_text())
    assert manifest["resolution"] == 64
