"""Stage extract_latents on the smoke shards with a tiny random-init tokenizer (never the train_tokenizer stage).

Run: .venv/bin/python -m pytest tests/stage/test_stage_extract_latents.py -q
The codes must equal a fresh encode of the same views bit for bit; a run killed with SIGKILL mid-split and rerun must
write byte-identical files to an uninterrupted run (batch size 1 and a slower tokenizer give the kill a window).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import yaml

from restok.artifacts import load_tokenizer, save_artifact
from restok import metrics
from restok.config.load import load_params
from restok.config.tokenizer import tokenizer_config
from restok.data.shards import iter_split
from restok.models.tokenizer import ResTok
from restok.provenance import read_results
from restok.stages import extract_latents


def _save_tokenizer(path, smoke_params, **overrides):
    p = load_params(smoke_params, ("data", "tokenizer"))
    cfg = replace(tokenizer_config(p.tokenizer, p.data.resolution, 16), **overrides)
    torch.manual_seed(0)
    model = ResTok(cfg)
    save_artifact(path, model.state_dict(), asdict(cfg), {"stage": "test", "weights": "random-init"})
    return path


@pytest.fixture(scope="module")
def tokenizer_pt(module_tmp, smoke_params):
    return _save_tokenizer(module_tmp("tok") / "tokenizer.pt", smoke_params)


@pytest.fixture(scope="module")
def extracted(module_tmp, smoke_params, smoke_shards, tokenizer_pt):
    root = module_tmp("latents")
    extract_latents.main(
        [
            "--params",
            str(smoke_params),
            "--shards",
            str(smoke_shards),
            "--tokenizer",
            str(tokenizer_pt),
            "--out",
            str(root / "data"),
            "--results",
            str(root / "results"),
        ]
    )
    return root


def test_dtype_selection():
    assert extract_latents.code_dtype(2) == np.uint8
    assert extract_latents.code_dtype(256) == np.uint8
    assert extract_latents.code_dtype(257) == np.uint16
    assert extract_latents.code_dtype(65536) == np.uint16
    assert extract_latents.code_dtype(65537) == np.int32


def test_outputs_match_fresh_encode(extracted, smoke_shards, tokenizer_pt):
    model, _ = load_tokenizer(tokenizer_pt, torch.device("cpu"))
    cfg = model.cfg
    for split, views in (("train", 10), ("val", 1)):
        d = extracted / "data" / split
        codes, labels = np.load(d / "codes.npy"), np.load(d / "labels.npy")
        meta = json.loads((d / "meta.json").read_text())
        n = meta["num_images"]
        assert codes.shape == (n, views, cfg.num_tokens) and codes.dtype == np.uint8  # codebook 32
        assert meta["codebook_size"] == cfg.codebook_size and meta["level_sizes"] == list(cfg.level_sizes)
        assert meta["views"] == views and meta["resolution"] == cfg.resolution
        assert sorted(os.listdir(d)) == ["codes.npy", "labels.npy", "meta.json"]
        kind = "ten_crop" if split == "train" else "eval"
        items = list(iter_split(smoke_shards, split))
        assert labels.tolist() == [label for _, _, label in items]
        imgs = torch.stack([extract_latents.image_views(img, kind, cfg.resolution, 1.1) for _, img, _ in items[:5]])
        with torch.inference_mode():
            fresh = model.encode(imgs.flatten(0, 1).float() / 255).view(5, views, -1)
        assert np.array_equal(codes[:5], fresh.numpy())
    summary = read_results(extracted / "results" / "summary.json")
    stats = summary["splits"]["train"]["codebook"]
    assert set(stats) == {f"level_{i}" for i in range(len(cfg.level_sizes))} | {"all"}
    val_codes = torch.from_numpy(np.load(extracted / "data/val/codes.npy")[:, 0].astype(np.int64))
    val_labels = torch.from_numpy(np.load(extracted / "data/val/labels.npy"))
    assert summary["splits"]["val"]["per_position"] == metrics.position_entropy(
        val_codes, cfg.level_sizes, cfg.codebook_size, val_labels
    )  # every val image, its eval view
    assert len(summary["splits"]["train"]["per_position"]["conditional_entropy_bits"]) == len(cfg.level_sizes)
    assert summary["profile"] == "smoke" and summary["tokenizer"]["provenance"]["weights"] == "random-init"


def test_refuses_resolution_mismatch(tmp_path, smoke_params, smoke_shards):
    tok = _save_tokenizer(tmp_path / "tok64.pt", smoke_params, resolution=64)
    with pytest.raises(ValueError, match=r"resolution 64.*resolution 32"):
        extract_latents.main(
            [
                "--params",
                str(smoke_params),
                "--shards",
                str(smoke_shards),
                "--tokenizer",
                str(tok),
                "--out",
                str(tmp_path / "data"),
                "--results",
                str(tmp_path / "results"),
            ]
        )
    assert not (tmp_path / "data").exists()


def _run(params, shards, tok, root):
    return [
        sys.executable,
        "-m",
        "restok.stages.extract_latents",
        "--params",
        str(params),
        "--shards",
        str(shards),
        "--tokenizer",
        str(tok),
        "--out",
        str(root / "data"),
        "--results",
        str(root / "results"),
    ]


def test_kill9_resume_gives_identical_files(tmp_path, smoke_params, smoke_shards):
    tree = yaml.safe_load(smoke_params.read_text())
    tree["extract_latents"]["batch_size"] = 1  # one image (10 views) per progress update
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree))
    tok = _save_tokenizer(tmp_path / "tok.pt", smoke_params, enc_width=128, dec_width=32, pixel_z_channels=64)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _run(params, smoke_shards, tok, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    progress_file = killed / "data.partial" / "train" / "progress.json"  # beside the out, which DVC deletes
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(progress_file.read_text())["done"] > 0:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    done = json.loads(progress_file.read_text())["done"]
    assert 0 < done < 48 and not (killed / "data" / "train" / "codes.npy").exists()
    shutil.rmtree(killed / "data", ignore_errors=True)  # what DVC and Snakemake do before the rerun

    clean = tmp_path / "clean"
    for root in (killed, clean):
        r = subprocess.run(_run(params, smoke_shards, tok, root), env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    resumed = read_results(killed / "results" / "summary.json")["splits"]["train"]
    assert resumed["resumed_from"] == done
    assert not (killed / "data.partial").exists()
    for split in ("train", "val"):
        for name in ("codes.npy", "labels.npy", "meta.json"):
            assert (killed / "data" / split / name).read_bytes() == (clean / "data" / split / name).read_bytes()
