"""The shard stage: manifests, determinism, real image trees (folder, ILSVRC layout), corrupt files, external
webdataset shards, and a kill -9 in the middle followed by a rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from restok.config.profiles import profile_tree
from restok.data.shards import iter_split, read_manifest
from restok.data.views import stored_train_side
from restok.hashing import sha256_file
from restok.stages import shard


def params_file(tmp_path: Path, **data) -> str:
    tree = profile_tree("smoke")
    tree["data"].update(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def run_shard(params: str, root: Path) -> Path:
    shard.main(["--params", params, "--out", str(root / "data/shard"), "--results", str(root / "results/shard")])
    return root / "data/shard"


def test_smoke_manifest(smoke_shards):
    for split, per_class, side in (("train", 12, stored_train_side(32)), ("val", 6, 32)):
        m = read_manifest(smoke_shards, split)
        assert m["num_samples"] == 4 * per_class and m["class_histogram"] == [per_class] * 4
        assert m["skipped"] == [] and m["resolution"] == 32
        for s in m["shards"]:
            assert sha256_file(smoke_shards / split / s["path"]) == s["sha256"]
        keys, labels = [], []
        for key, img, label in iter_split(smoke_shards, split):
            assert min(img.size) == side and (split == "train" or img.size == (32, 32))
            keys.append(key)
            labels.append(label)
        assert len(set(keys)) == len(keys) == m["num_samples"]
        assert np.bincount(labels).tolist() == [per_class] * 4
    train_labels = [label for _, _, label in iter_split(smoke_shards, "train")]
    assert train_labels != sorted(train_labels), "train order is shuffled across shards"


def test_rerun_gives_identical_shards(smoke_params, smoke_shards, tmp_path):
    again = run_shard(str(smoke_params), tmp_path)
    for split in ("train", "val"):
        assert read_manifest(again, split) == read_manifest(smoke_shards, split)


def _image_tree(root: Path, sizes_by_class: dict[str, list[tuple[int, int]]]):
    rng = np.random.default_rng(0)
    for cls, sizes in sizes_by_class.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"img{i}.{'png' if i % 2 else 'jpg'}")


def test_folder_tree_with_a_corrupt_file(tmp_path):
    root = tmp_path / "photos"
    _image_tree(root, {"cats": [(50, 40)] * 7, "dogs": [(33, 60)] * 5, "owls": [(64, 64)] * 4})
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "owls" / "notes.txt").write_text("not an image")
    params = params_file(tmp_path, source="folder", root=str(root), num_classes=3, val_fraction=0.25)
    out = run_shard(params, tmp_path / "ws")
    train, val = read_manifest(out, "train"), read_manifest(out, "val")
    assert train["class_names"] == ["cats", "dogs", "owls"]
    assert [a + b for a, b in zip(train["class_histogram"], val["class_histogram"])] == [7, 5, 4]
    assert val["class_histogram"] == [2, 2, 1]  # round(0.25 * n) held out per class; the broken file counted
    skipped = train["skipped"] + val["skipped"]
    assert len(skipped) == 1 and skipped[0]["path"].endswith("broken.jpg") and "Error" in skipped[0]["reason"]
    summary = json.loads((tmp_path / "ws/results/shard/summary.json").read_text())
    assert summary["splits"]["train"]["num_skipped"] + summary["splits"]["val"]["num_skipped"] == 1
    for _, img, _ in iter_split(out, "train"):
        assert min(img.size) == stored_train_side(32)


def test_an_image_too_thin_to_resize_is_skipped_and_listed(tmp_path):
    """A 2 x 3000 strip has 6,000 pixels, but resized to the stored short side (40 px for train at res 32, 32 for
    val) it would hold 40 x 60,000: more than shard.max_image_pixels, so it is listed as skipped, not stored."""
    root = tmp_path / "photos"
    _image_tree(root, {"a": [(40, 40)] * 3, "b": [(40, 40)] * 3})
    Image.new("RGB", (2, 3000), (200, 10, 10)).save(root / "a" / "strip.png")
    tree = profile_tree("smoke")
    tree["data"].update(source="folder", root=str(root), num_classes=2, val_fraction=0.25)
    tree["shard"]["max_image_pixels"] = 1_000_000
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree))
    out = run_shard(str(params), tmp_path / "ws")
    train, val = read_manifest(out, "train"), read_manifest(out, "val")
    skipped = train["skipped"] + val["skipped"]
    assert [Path(s["path"]).name for s in skipped] == ["strip.png"]
    assert "2x3000 would be resized to" in skipped[0]["reason"] and "max_image_pixels=1000000" in skipped[0]["reason"]
    assert train["num_samples"] + val["num_samples"] == 6


KILLED_WORKER = """
import os, signal, sys
from restok.stages import shard

encode = shard._encode_shard


def killed_on_the_second_shard(job):  # what the OOM killer does to a worker
    if job[0].endswith("train-000001.tar"):
        os.kill(os.getpid(), signal.SIGKILL)
    return encode(job)


shard._encode_shard = killed_on_the_second_shard
shard.main(sys.argv[1:])
"""


def test_a_killed_worker_stops_the_stage_with_a_message_instead_of_hanging(smoke_params, tmp_path):
    out = tmp_path / "shard"
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED_WORKER,
            "--params",
            str(smoke_params),
            "--out",
            str(out),
            "--results",
            str(tmp_path / "results"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode != 0
    assert "shard train: a worker process died" in p.stderr and "train-000001.tar" in p.stderr, p.stderr[-2000:]
    assert not (out / "train" / "manifest.json").exists()


def test_folder_class_count_mismatch_is_refused(tmp_path):
    root = tmp_path / "photos"
    _image_tree(root, {"a": [(40, 40)] * 2, "b": [(40, 40)] * 2})
    params = params_file(tmp_path, source="folder", root=str(root), num_classes=5)
    with pytest.raises(ValueError, match="data.num_classes=5 .* 2 class folders"):
        run_shard(params, tmp_path / "ws")
    assert not (tmp_path / "ws").exists()


def test_imagenet_layout_with_flat_val_and_labels_csv(tmp_path):
    root = tmp_path / "ILSVRC2012"
    _image_tree(root / "train", {"n01440764": [(80, 60)] * 3, "n01443537": [(60, 80)] * 2})
    (root / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for i, wnid in enumerate(["n01443537", "n01440764", "n01443537"]):
        Image.new("RGB", (70, 50), (i * 40, 0, 0)).save(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
        rows.append(f"ILSVRC2012_val_{i:08d},{wnid} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    params = params_file(
        tmp_path, source="imagenet", root=str(root), num_classes=2, val_labels=str(root / "LOC_val_solution.csv")
    )
    out = run_shard(params, tmp_path / "ws")
    assert read_manifest(out, "train")["class_histogram"] == [3, 2]
    assert read_manifest(out, "val")["class_histogram"] == [1, 2]
    assert sorted(label for *_, label in iter_split(out, "val")) == [0, 1, 1]


def test_external_wds_shards_are_converted_like_files(smoke_shards, tmp_path):
    params = params_file(
        tmp_path,
        source="wds",
        wds={
            "train": str(smoke_shards / "train/train-{000000..000002}.tar"),
            "val": str(smoke_shards / "val/val-{000000..000001}.tar"),
        },
    )
    out = run_shard(params, tmp_path / "ws")
    m = read_manifest(out, "train")
    assert m["num_samples"] == 48 and m["class_histogram"] == [12] * 4 and m["skipped"] == []
    assert len(list((out / "train").glob("*.tar"))) == 3
    assert [s["sha256"] for s in m["sources"]] == [s["sha256"] for s in read_manifest(smoke_shards, "train")["shards"]]
    for split in ("train", "val"):  # already stored images go through the store transform unchanged
        ours, theirs = list(iter_split(out, split)), list(iter_split(smoke_shards, split))
        assert len(ours) == len(theirs) and sum(1 for _ in iter_split(out, "val")) == 24
        for (_, a, la), (_, b, lb) in zip(ours, theirs):
            assert la == lb and np.array_equal(np.asarray(a), np.asarray(b))


def test_kill_9_leaves_nothing_that_looks_complete_and_rerun_matches(tmp_path):
    tree = profile_tree("smoke")
    tree["data"]["builtin"] = {"train_per_class": 150, "val_per_class": 10, "seed": 0}
    tree["data"]["resolution"] = 64
    tree["shard"].update(samples_per_shard=20, workers=1)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree))

    def cmd(root):
        return [
            sys.executable,
            "-m",
            "restok.stages.shard",
            "--params",
            str(params),
            "--out",
            str(root / "shard"),
            "--results",
            str(root / "results"),
        ]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not list((killed / "shard/train").glob("train-*.tar")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((killed / "shard/train").glob("train-*.tar")), "the stage was killed before writing any shard"
    assert not (killed / "shard/train/manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="has not finished"):
        read_manifest(killed / "shard", "train")

    subprocess.run(cmd(killed), check=True, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run(cmd(clean), check=True, capture_output=True)
    for split in ("train", "val"):
        assert read_manifest(killed / "shard", split) == read_manifest(clean / "shard", split)
        assert not list((killed / "shard" / split).glob("*.tmp"))
