"""The official-l profile end to end on stand-in checkpoints written in the released layout.

`dvc repro` on the official-l profile, with only the sizes changed (the official "small" ViT tokenizer at 128 px and
a 2-layer HAR GPT instead of the L models, built data, 2 samples per class, random-init Inception): nothing trains,
the tokenizer comes from the Hugging Face cache under the profile's own repo id (HF_HUB_CACHE, offline) and the
generator from a local folder (`official.file`), both through the importer a user runs.
"""

from __future__ import annotations

import json
import dataclasses

import numpy as np
import pytest
import torch
import yaml

from restok.artifacts import load_artifact
from restok.config.engine import deep_merge
from restok.config.generator import GeneratorParams
from restok.config.profiles import profile_tree
from restok.config.tokenizer import TokenizerParams
from restok.convert.checkpoint import export_official_checkpoint, weights_file
from restok.convert.official import official_generator_config
from restok.convert.tokenizer import official_tokenizer_config
from restok.models.generator import HARGenerator
from restok.models.tokenizer import ResTok
from restok.provenance import read_results
from restok.hashing import sha256_file

from .conftest import make_workspace, run

TOKENIZER_REPO = "xushu-me/restok_l_128.r256_in1k"
# the official "small" ViTs at 128 px (docs/method.md, restok §5.1 tiny-parity): the smallest tokenizer the layout allows
SMALL_VQ = dict(
    codebook_size=64,
    token_size=8,
    use_l2_norm=True,
    commitment_cost=0.25,
    entropy_loss_ratio=0.0,
    vit_enc_model_size="small",
    vit_dec_model_size="small",
    vit_enc_patch_size=16,
    vit_dec_patch_size=16,
    rope_base_len=10_000,
    num_latent_tokens=32,
    num_min_tokens=4,
    test_num_latent_tokens=32,
    merge_tokens=True,
    hierarchy_stages=4,
    reduction_ratio=0.5,
    residual_image_tokens=True,
    residual_latent_tokens=True,
    learnable_latent_tokens=False,
    learnable_dec_image_tokens=True,
    multi_quant=True,
    vae_encoder=True,
    drop_latent_tokens=True,
    drop_prob=0.2,
    latent_hierarchy=True,
    encoder_feature_supervision=True,
    decoder_feature_supervision=True,
    learnable_dec_feat_tokens=True,
    use_vf="dinov3",
    reverse_proj=True,
)
GPT_ARGS = dict(
    dim=64,
    n_layer=2,
    n_head=4,
    n_kv_head=None,
    multiple_of=256,
    ffn_dim_multiplier=None,
    rope_base=10000,
    norm_eps=1e-5,
    initializer_range=0.02,
    token_dropout_p=0.1,
    attn_dropout_p=0.0,
    resid_dropout_p=0.1,
    ffn_dropout_p=0.1,
    drop_path_rate=0.0,
    num_classes=4,
    caption_dim=2048,
    class_dropout_prob=0.1,
    model_type="c2i",
    vocab_size=64,
    cls_token_num=1,
    block_size=32,
    max_batch_size=32,
    max_seq_len=2048,
    ar_token_num=4,
    spe_token_num=31,
)


def _section(cfg, params_cls) -> dict:
    names = {f.name for f in dataclasses.fields(params_cls)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items() if k in names}


@pytest.fixture(scope="module")
def official_ws(module_tmp):
    ws = make_workspace(module_tmp("official"), profile="official-l")
    torch.manual_seed(0)
    tok_cfg = official_tokenizer_config(
        {"model": {"vq_model": SMALL_VQ}, "dataset": {"preprocessing": {"crop_size": 128}}}
    )
    tokenizer = ResTok(tok_cfg).eval()
    gen_cfg = official_generator_config(GPT_ARGS)
    generator = HARGenerator(gen_cfg).eval()
    # the tokenizer as huggingface_hub caches a snapshot of the profile's repo; the generator as a local folder
    snapshot = ws / "hf" / f"models--{TOKENIZER_REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    pin = sha256_file(weights_file(export_official_checkpoint(tokenizer, snapshot)))  # hub weights are used pinned
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    export_official_checkpoint(generator, ws / "released" / "generator", weights_format="bin")

    over = {
        "data": {
            "source": "builtin",
            "root": None,
            "resolution": 128,
            "num_classes": 4,
            "builtin": {"train_per_class": 12, "val_per_class": 4, "seed": 0},
        },
        "shard": {"samples_per_shard": 8, "workers": 2},
        "tokenizer": _section(tok_cfg, TokenizerParams),
        "generator": _section(gen_cfg, GeneratorParams),
        "fid": {
            "extractor": "inception-v3-compat-random-init",
            "reference": "val",
            "adm_batch": None,
            "batch_size": 16,
        },
        "train_tokenizer": {"loop": {"batch_size": 8}, "eval_images": 8, "official": {"sha256": pin}},
        "extract_latents": {"batch_size": 8},
        "train_generator": {"loop": {"batch_size": 8}, "official": {"file": str(ws / "released" / "generator")}},
        "sample": {"per_class": 2, "batch_size": 8, "grid_per_class": 2},
        "cfg_search": {"scales": [3.75], "per_class": 1},
    }
    tree = deep_merge(profile_tree("official-l"), over)
    (ws / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    run(["dvc", "repro"], ws, env={"HF_HUB_CACHE": str(ws / "hf")}, timeout=1200)
    return ws, tokenizer, generator


def test_official_profile_imports_instead_of_training(official_ws):
    ws, tokenizer, generator = official_ws
    tok_metrics = read_results(ws / "results/train_tokenizer/metrics.json")
    gen_metrics = read_results(ws / "results/train_generator/metrics.json")
    assert tok_metrics["weights"].startswith(f"official:{TOKENIZER_REPO}@")
    assert tok_metrics["official"]["source"].startswith(str(ws / "hf"))  # through huggingface_hub's cache
    assert gen_metrics["weights"].startswith("official:xushu-me/llamagen_l_c2i_restok_l_128.r256_in1k@")
    assert gen_metrics["official"]["source"] == str(ws / "released" / "generator" / "pytorch_model.bin")
    assert gen_metrics["official"]["local_file"] == str(ws / "released" / "generator")
    assert tok_metrics["step"] is None and gen_metrics["steps"] is None and tok_metrics["train_seconds"] is None
    for stage in ("train_tokenizer", "train_generator"):
        assert len((ws / f"results/{stage}/curve.tsv").read_text().splitlines()) == 1  # the header: no step ran
        assert not (ws / f"data/{stage}/ckpt").exists()
    # the artifacts hold exactly the released weights
    for path, model in (
        ("data/train_tokenizer/tokenizer.pt", tokenizer),
        ("data/train_generator/generator.pt", generator),
    ):
        state, _, provenance = load_artifact(ws / path)
        assert provenance["official"]["sha256"]
        ours = model.state_dict()
        assert set(state) == set(ours)
        for key, value in ours.items():
            assert torch.equal(state[key], value), (path, key)
    # only val was sharded; no teacher features were cached
    shard = json.loads((ws / "results/shard/summary.json").read_text())
    assert shard["splits"]["train"]["num_samples"] == 0 and shard["splits"]["val"]["num_samples"] == 16
    assert json.loads((ws / "results/cache_features/summary.json").read_text())["cached"] is False
    latents = json.loads((ws / "results/extract_latents/summary.json").read_text())
    assert latents["splits"]["train"]["num_images"] == 0 and latents["splits"]["val"]["num_images"] == 16


def test_official_profile_samples_and_scores_with_the_paper_settings(official_ws):
    ws, _, _ = official_ws
    summary = read_results(ws / "results/sample/summary.json")  # with its provenance.json (the sampling config)
    assert summary["cfg"]["cfg_scale"] == 3.75 and summary["cfg"]["cfg_schedule"] == "step"
    assert summary["cfg"]["window_start"] == 0.25 and summary["cfg"]["top_p"] == 0.95
    assert summary["precision"] == "fp32" and summary["compile"] is True  # the paper's fp32; compiled passes
    with np.load(ws / "data/sample/samples.npz") as npz:
        assert npz["arr_0"].shape == (8, 128, 128, 3)
    head = read_results(ws / "results/metrics.json")
    assert head["tokenizer_weights"].startswith("official:") and head["generator_weights"].startswith("official:")
    assert np.isfinite(head["gFID"]) and np.isfinite(head["rFID"])
    readme = (ws / "results/README.md").read_text()
    assert "Tokenizer weights: official:" in readme and "NOT REAL METRICS" in readme  # random-init Inception
    assert "up to date" in run(["dvc", "status"], ws, env={"HF_HUB_CACHE": str(ws / "hf")}).stdout


def test_params_that_do_not_describe_the_checkpoint_are_refused(official_ws):
    ws, _, _ = official_ws
    tree = yaml.safe_load((ws / "params.yaml").read_text())
    tree["tokenizer"]["rope_theta"] = 5000.0
    tree["tokenizer"]["drop_prob"] = 0.5  # training-only: not compared
    (ws / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    p = run(["dvc", "repro", "train_tokenizer"], ws, check=False, env={"HF_HUB_CACHE": str(ws / "hf")})
    assert p.returncode != 0
    assert "rope_theta: params 5000.0, checkpoint 10000.0" in p.stderr + p.stdout
    assert "drop_prob" not in (p.stderr + p.stdout).split("does not describe")[1]
    assert not (ws / "data/train_tokenizer/tokenizer.pt").exists()  # nothing half-written was left behind
