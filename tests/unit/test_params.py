"""params.yaml validation: the dataclasses and the generated JSON schema agree, and bad values are refused with
messages that name the file, the key and the value, before anything is written."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jsonschema
import pytest
import yaml

from restok.config.engine import REPO, ParamsError
from restok.config.load import load_params
from restok.config.profiles import PROFILES_DIR, profile_tree, write_profile
from restok.config.schema import SCHEMA_PATH, json_schema, schema_text
from restok.config.validate import check_file
from restok.losses.loss_config import LossConfig
from restok.models.tokenizer_config import TokenizerConfig

PROFILES = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def test_schema_file_is_generated_from_the_dataclasses():
    assert SCHEMA_PATH.read_text() == schema_text(), "run `restok schema` and commit the result"


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_validates_in_both(name, tmp_path):
    path = write_profile(name, tmp_path / "params.yaml")
    load_params(path)
    jsonschema.validate(yaml.safe_load(path.read_text()), json_schema())


def test_committed_params_yaml_is_the_default_profile():
    assert yaml.safe_load((REPO / "params.yaml").read_text()) == profile_tree("default")


def _write(tmp_path, mutate) -> str:
    tree = profile_tree("default")
    mutate(tree)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


BAD = {
    "wrong type": (lambda t: t["data"].__setitem__("resolution", "big"), "data.resolution", "'big'"),
    "unknown key": (lambda t: t["shard"].__setitem__("workerz", 2), "shard", "workerz"),
    "missing key": (lambda t: t["shard"].pop("workers"), "shard", "workers"),
    "bad enum": (lambda t: t["data"].__setitem__("source", "s3"), "data.source", "'s3'"),
    "out of range": (lambda t: t["data"].__setitem__("resolution", 4), "data.resolution", "4"),
    "nested": (lambda t: t["train_tokenizer"]["optim"].__setitem__("lr", "fast"), "train_tokenizer.optim.lr", "fast"),
    "model rule": (lambda t: t["tokenizer"].__setitem__("merge_op", "max"), "tokenizer", "merge_op"),
    "cross-section": (lambda t: t["data"].__setitem__("resolution", 56), "tokenizer", "resolution=56"),
    "needs a root": (lambda t: t["data"].__setitem__("source", "folder"), "data.root", "folder"),
    "unknown section": (lambda t: t.__setitem__("trainer", {}), "trainer", "allowed"),
    "generator has no pixel CNN": (
        lambda t: t["train_generator"]["loop"].__setitem__("checkpointing", "all"),
        "train_generator.loop.checkpointing",
        "'all'",
    ),
    "variant key": (
        lambda t: t["ablations"]["variants"].__setitem__("x", {"tokenizer.nope": 1}),
        "ablations.variants",
        "tokenizer.nope",
    ),
    "variant value": (
        lambda t: t["ablations"]["variants"].__setitem__("x", {"generator.mode": "diffusion"}),
        "ablations.variants.x",
        "diffusion",
    ),
    "variant name": (
        lambda t: t["ablations"]["variants"].__setitem__("x$(touch /tmp/pwn)", {}),
        "ablations.variants",
        "x$(touch /tmp/pwn)",
    ),
    "rope theta": (lambda t: t["tokenizer"].__setitem__("rope_theta", -1.0), "tokenizer.rope_theta", "-1.0"),
    "no cfg scales": (lambda t: t["cfg_search"].__setitem__("scales", []), "cfg_search.scales", "[]"),
    "cfg scale 0": (lambda t: t["cfg_search"].__setitem__("scales", [1.0, 0.0]), "cfg_search.scales", "0.0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_params_are_refused_naming_file_and_key(case, tmp_path):
    mutate, key, value = BAD[case]
    path = _write(tmp_path, mutate)
    with pytest.raises(ParamsError) as e:
        (check_file if case.startswith("variant") else load_params)(path)
    msg = str(e.value)
    assert path in msg and key in msg and value in msg, msg


def test_a_variant_params_file_loads_although_another_variant_conflicts_with_it(tmp_path):
    """Inside an ablation run params.yaml is already one variant (flat queries, learned init); composing another
    variant (pooled init) on it is invalid, and must not stop the run's stages (the grid's flat_queries run did)."""
    from restok import ablate

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(ablate.runs(profile_tree("default"))["flat_queries-s0"]))
    assert load_params(path, ("tokenizer",)).tokenizer.latent_queries == "flat"
    with pytest.raises(ParamsError, match="no_residual_latents"):
        check_file(path)


def test_schema_refuses_what_the_dataclasses_refuse(tmp_path):
    for case in (
        "wrong type",
        "unknown key",
        "missing key",
        "bad enum",
        "out of range",
        "unknown section",
        "variant name",
    ):
        tree = profile_tree("default")
        BAD[case][0](tree)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(tree, json_schema())


@pytest.mark.parametrize(
    "after, line, key",
    [
        ("\ntrain_generator:\n", "  val_batches: 9\n", "train_generator.val_batches"),  # nested
        (None, "profile: other\n", "profile"),  # top level, at the end
    ],
)
def test_duplicate_keys_are_refused_naming_file_key_and_lines(tmp_path, after, line, key):
    """YAML keeps the last of two equal keys without a word; the loader refuses the file instead."""
    text = yaml.safe_dump(profile_tree("default"))
    text = text.replace(after, after + line, 1) if after else text + line
    path = tmp_path / "params.yaml"
    path.write_text(text)
    first, second = [i + 1 for i, t in enumerate(text.splitlines()) if t.startswith(line.split(":")[0] + ":")]
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert f"{path}:{key}: duplicate key (lines {first} and {second})" in str(e.value), str(e.value)


def _run_shard(params: str, out) -> subprocess.CompletedProcess:
    """The shard stage on `params`, writing under `out` (which must stay absent when params are refused)."""
    cmd = ["--params", params, "--out", str(out / "data"), "--results", str(out / "results")]
    return subprocess.run([sys.executable, "-m", "restok.stages.shard", *cmd], capture_output=True, text=True)


def test_stage_refuses_bad_params_before_writing_anything(tmp_path):
    path = _write(tmp_path, lambda t: t["shard"].__setitem__("samples_per_shard", 0))
    out = tmp_path / "out"
    p = _run_shard(path, out)
    assert p.returncode != 0 and "shard.samples_per_shard" in p.stderr
    assert not out.exists()


def test_stage_refuses_a_bad_section_it_does_not_read_before_writing_anything(tmp_path):
    """shard imports only its own sections' code, yet the whole-file check (every section, the rules across them)
    still runs first: a bad generator value stops it, naming the key."""
    path = _write(tmp_path, lambda t: t["generator"].__setitem__("mode", "diffusion"))
    out = tmp_path / "out"
    p = _run_shard(path, out)
    assert p.returncode != 0 and "generator.mode" in p.stderr and "'diffusion'" in p.stderr, p.stderr[-2000:]
    assert not out.exists()


def test_a_stage_params_type_must_be_the_sections_type():
    from restok.config.data import Data

    with pytest.raises(TypeError, match="'shard'"):
        load_params(REPO / "params.yaml", {"profile": str, "shard": Data})


def test_stage_args_parses_the_artifact_paths_then_loads_the_stage_sections():
    from restok.config.data import Data
    from restok.config.load import stage_args

    args, p = stage_args(
        "doc",
        {"profile": str, "data": Data},
        ["--params", str(REPO / "params.yaml"), "--tokenizer-metrics", "m.json"],
        tokenizer_metrics="results/x.json",
        out="data/x",
    )
    assert (args.params, args.tokenizer_metrics, args.out) == (str(REPO / "params.yaml"), "m.json", "data/x")
    assert set(p.sections) == {"profile", "data"} and isinstance(p.data, Data)


def test_missing_data_root_is_named(tmp_path):
    path = _write(tmp_path, lambda t: t["data"].update(source="folder", root=str(tmp_path / "nope")))
    from restok.stages import shard

    with pytest.raises(ValueError, match="data.root=.*nope.*not found"):
        shard.main(["--params", path, "--out", str(tmp_path / "d"), "--results", str(tmp_path / "r")])
    assert not (tmp_path / "d").exists()


def test_profile_section_view_refuses_undeclared_sections(tmp_path):
    p = load_params(REPO / "params.yaml", ("profile", "data"))
    with pytest.raises(AttributeError, match="not declared"):
        _ = p.shard


def test_cli_profile_and_validate(tmp_path):
    out = tmp_path / "p.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "restok.cli", "profile", "smoke", "--out", str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0 and yaml.safe_load(out.read_text())["profile"] == "smoke"
    bad = _write(tmp_path, lambda t: t["data"].__setitem__("num_classes", 1))
    r = subprocess.run([sys.executable, "-m", "restok.cli", "validate", bad], capture_output=True, text=True)
    assert r.returncode == 2 and "data.num_classes" in r.stderr


# The default profile's departures from the official recipe (docs/experiments.md: "the default recipe's
# departures"), besides the model's size; the paper's profiles must keep the official value of every one of them.
DEFAULT_DEPARTURES = {
    "image_queries",
    "legacy_head",
    "commitment_cost",
    "weight_init",
    "codebook_init",
    "dead_code_steps",
    "grey_start",
}
SIZE_FIELDS = {
    "pixel_channels",
    "pixel_res_blocks",
    "pixel_z_channels",
    "enc_width",
    "enc_depth",
    "enc_heads",
    "dec_width",
    "dec_depth",
    "dec_heads",
    "level_sizes",
    "codebook_size",
}


def _departures(section: dict, official) -> set[str]:
    defaults = dataclasses.asdict(official)
    return {
        key
        for key, value in section.items()
        if key in defaults and value != (list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key])
    }


def test_default_departs_from_the_official_tokenizer_recipe_only_by_the_named_switches():
    assert _departures(profile_tree("default")["tokenizer"], TokenizerConfig()) - SIZE_FIELDS == DEFAULT_DEPARTURES
    assert _departures(profile_tree("default")["train_tokenizer"]["loss"], LossConfig()) == {
        "lpips_weight",
        "lpips_weights",
        "vf_enc_weight",
        "vf_dec_weight",
        "gan_weight",
    }


def test_paper_profiles_keep_the_official_tokenizer_recipe_and_loss_weights():
    """TokenizerConfig's and LossConfig's defaults are the official config's (docs/method.md, training-and-eval §1.1);
    imagenet256 once inherited default.yaml's CPU VF weights (0.1 instead of the official 1.0)."""
    assert _departures(profile_tree("imagenet256")["tokenizer"], TokenizerConfig()) == set()
    assert _departures(profile_tree("official-l")["tokenizer"], TokenizerConfig()) == {"drop_prob"}  # released: 0.0
    assert _departures(profile_tree("imagenet256")["train_tokenizer"]["loss"], LossConfig()) == set()
