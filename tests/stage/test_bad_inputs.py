"""Bad inputs a user's image folder or params may hold: each is converted correctly, refused with an
error naming the file or key, or skipped and listed in the manifest; never lost silently.

    python -m pytest -q tests/stage/test_bad_inputs.py

Every case generates its own file. The last test puts all the per-file cases in one folder and checks that the
shard stage converts or lists each of them and loses nothing else.
"""

from __future__ import annotations

import gzip
import json
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageCms, UnidentifiedImageError

from restok.config.data import Shard
from restok.config.engine import ParamsError
from restok.config.load import load_params
from restok.config.profiles import profile_tree
from restok.data.shards import iter_split, read_manifest, store_transform
from restok.data.sources import Item, SourceError, list_items, load_image, to_rgb
from restok.stages import shard

WHITE = (255, 255, 255)


def params_file(tmp_path: Path, shard_over: dict | None = None, **data) -> str:
    tree = profile_tree("smoke")
    tree["data"].update(data)
    tree["shard"].update(shard_over or {})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def load(path: Path, **shard_over) -> Image.Image:
    p = load_params(params_file(path.parent, shard_over, source="folder", root=str(path.parent), num_classes=2))
    return load_image(Item(key="00000000", label=0, path=str(path)), p.data, p.shard)


def run_shard(params: str, root: Path) -> Path:
    shard.main(["--params", params, "--out", str(root / "data/shard"), "--results", str(root / "results/shard")])
    return root / "data/shard"


# ------------------------------------------------------------------------------------- generated bad files
def png16(path: Path) -> np.ndarray:
    """A 16-bit grey PNG: a horizontal ramp over the whole 0..65535 range; returns the expected 8-bit values."""
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(path)
    return (ramp.astype(np.int64) * 255 + 32767) // 65535


def exif_rotated(path: Path) -> None:
    """Stored 40x20 (left half red, right half blue), EXIF orientation 6: shown rotated 90 degrees clockwise."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, exif=exif)


def rgba(path: Path) -> None:
    """Left half transparent red, right half opaque green."""
    a = np.zeros((16, 32, 4), np.uint8)
    a[:, :16] = (255, 0, 0, 0)
    a[:, 16:] = (0, 255, 0, 255)
    Image.fromarray(a, "RGBA").save(path)


def cmyk(path: Path) -> None:
    """A CMYK JPEG without a profile: left half pure magenta+yellow (red), right half no ink (white)."""
    a = np.zeros((16, 32, 4), np.uint8)
    a[:, :16] = (0, 255, 255, 0)
    Image.fromarray(a, "CMYK").save(path, quality=100)


# ------------------------------------------------------------------------------------------ one per case
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    want = png16(tmp_path / "deep.png")
    got = np.asarray(load(tmp_path / "deep.png"))
    assert got.shape == (16, 64, 3) and (got[..., 0] == got[..., 2]).all()
    assert np.abs(got[..., 0].astype(int) - want).max() <= 1
    assert (got == 255).mean() < 0.05, "not the old all-white result"


def test_exif_orientation_is_applied(tmp_path):
    exif_rotated(tmp_path / "phone.jpg")
    got = np.asarray(load(tmp_path / "phone.jpg")).astype(int)
    assert got.shape == (40, 20, 3)  # portrait, as the camera meant
    assert np.abs(got[5, 10] - (255, 0, 0)).max() < 40 and np.abs(got[35, 10] - (0, 0, 255)).max() < 40


def test_alpha_is_composited_on_the_stated_background(tmp_path):
    rgba(tmp_path / "logo.png")
    assert load(tmp_path / "logo.png").getpixel((4, 4)) == WHITE  # the default, shard.alpha_background
    blue = load(tmp_path / "logo.png", alpha_background=[0, 0, 255])
    assert blue.getpixel((4, 4)) == (0, 0, 255) and blue.getpixel((24, 4)) == (0, 255, 0)
    half = Image.new("LA", (4, 4), (0, 128))  # grey-with-alpha: black at half opacity on white
    assert to_rgb(half, WHITE).getpixel((0, 0)) == (127, 127, 127)


def test_cmyk_without_a_profile_is_converted(tmp_path):
    cmyk(tmp_path / "print.jpg")
    got = np.asarray(load(tmp_path / "print.jpg")).astype(int)
    assert np.abs(got[8, 4] - (255, 0, 0)).max() < 8 and np.abs(got[8, 28] - WHITE).max() < 8


def test_an_embedded_icc_profile_is_applied(tmp_path):
    # No CMYK profile can be generated here (littlecms builds only sRGB/Lab/XYZ ones), so the profile path is
    # checked on an RGB image carrying sRGB: converting through it must keep the colours.
    a = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(a).save(tmp_path / "tagged.png", icc_profile=icc)
    assert Image.open(tmp_path / "tagged.png").info["icc_profile"] == icc
    assert np.abs(np.asarray(load(tmp_path / "tagged.png")).astype(int) - a).max() <= 2


def test_decompression_bomb_limit_is_a_param(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    assert load(tmp_path / "big.png", max_image_pixels=1600).size == (40, 40)
    with pytest.raises(ValueError, match=r"40x40 = 1600 pixels exceeds shard.max_image_pixels=1599"):
        load(tmp_path / "big.png", max_image_pixels=1599)


def test_empty_class_folder_is_refused_by_name(tmp_path):
    root = tmp_path / "photos"
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "cats" / "a.png")
    Image.new("RGB", (8, 8)).save(root / "cats" / "b.png")
    (root / "dogs" / "notes.txt").write_text("no image here")
    p = load_params(params_file(tmp_path, source="folder", root=str(root), num_classes=2))
    with pytest.raises(SourceError, match=rf"class folder {root / 'dogs'} holds no images"):
        list_items(p.data, "train")


def test_small_classes_get_a_val_image_or_a_clear_refusal(tmp_path):
    root = tmp_path / "photos"
    for c, n in (("cats", 3), ("dogs", 20)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(root / c / f"{i}.png")
    p = load_params(params_file(tmp_path, source="folder", root=str(root), num_classes=2, val_fraction=0.1))
    val, _ = list_items(p.data, "val")
    train, _ = list_items(p.data, "train")
    assert [sum(it.label == c for it in val) for c in (0, 1)] == [1, 2]  # 3 at 10% rounds to 0: held out 1
    assert [sum(it.label == c for it in train) for c in (0, 1)] == [2, 18]
    for f in list((root / "cats").iterdir())[1:]:
        f.unlink()
    with pytest.raises(SourceError, match=rf"class folder {root / 'cats'} holds 1 image: at least 2"):
        list_items(p.data, "val")


def test_empty_val_split_is_a_clear_error(tmp_path):
    root = tmp_path / "photos"
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(root / c / f"{i}.png")
    p = load_params(params_file(tmp_path, source="folder", root=str(root), num_classes=2, val_fraction=0.0))
    with pytest.raises(SourceError, match=r"the val split has no images \(data.val_fraction is 0\)"):
        list_items(p.data, "val")
    # every val image unreadable: refused by the stage, naming one, instead of a StopIteration later
    split = tmp_path / "split"
    for s in ("train", "val"):
        for c in ("cats", "dogs"):
            (split / s / c).mkdir(parents=True)
    for c in ("cats", "dogs"):
        Image.new("RGB", (8, 8)).save(split / "train" / c / "0.png")
        (split / "val" / c / "0.png").write_bytes(b"not a png")
    params = params_file(tmp_path, source="folder", root=str(split), num_classes=2)
    with pytest.raises(ValueError, match=r"shard val: none of its 2 images could be read, e\.g\. .*0\.png"):
        run_shard(params, tmp_path / "ws")


def test_nan_and_inf_in_params_are_refused(tmp_path):
    for value in (float("nan"), float("inf"), float("-inf")):
        tree = profile_tree("smoke")
        tree["data"]["val_fraction"] = value
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(tree))
        with pytest.raises(
            ParamsError,
            match=rf"params.yaml:data.val_fraction: expected a finite number, got "
            rf"{value!r}",
        ):
            load_params(path)


def test_alpha_background_is_checked():
    with pytest.raises(ValueError, match=r"shard.alpha_background must be 3 values"):
        Shard(alpha_background=[255, 255])
    with pytest.raises(ValueError, match=r"in 0..255, got \[0, 0, 256\]"):
        Shard(alpha_background=[0, 0, 256])


def test_compressed_external_shard_is_refused_by_name(smoke_shards, tmp_path):
    plain = smoke_shards / "train" / "train-000000.tar"
    gz = tmp_path / "train-000000.tar.gz"
    with open(plain, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    params = params_file(tmp_path, source="wds", wds={"train": str(gz), "val": str(plain)})
    with pytest.raises(
        ValueError,
        match=rf"data.wds.train=.*: {gz} is gzip-compressed; external shards must "
        rf"be plain .tar",
    ):
        run_shard(params, tmp_path / "ws")


# ------------------------------------------------------------------------------- every input accounted for
def test_a_class_whose_files_are_all_unreadable_is_refused_by_name(tmp_path):
    root = tmp_path / "photos"
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            if c == "cats":
                Image.new("RGB", (24, 24), (40 * i, 0, 0)).save(root / c / f"{i}.png")
            else:
                (root / c / f"{i}.png").write_bytes(b"\x89PNG truncated")
    params = params_file(tmp_path, source="folder", root=str(root), num_classes=2, val_fraction=0.3)
    with pytest.raises(
        ValueError,
        match=r"shard train: class 'dogs' kept no image: every file of it was skipped "
        r"\(e\.g\. .*dogs/\d\.png: ",
    ):
        run_shard(params, tmp_path / "ws")
    assert not (tmp_path / "ws/data/shard/train/manifest.json").exists()


def test_files_skipped_by_kind_are_counted_and_listed(tmp_path):
    root = tmp_path / "photos"
    for split in ("train", "val"):
        for c in ("cats", "dogs"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (24, 24), (40 * i, 100, 0)).save(root / split / c / f"{i}.png")
    cats = root / "train" / "cats"
    Image.new("RGB", (24, 24)).save(cats / "anim.gif")
    (cats / "phone.heic").write_bytes(b"heic")
    (cats / "README").write_text("no extension")
    Image.new("RGB", (24, 24)).save(cats / ".hidden.png")
    (cats / "more").mkdir()
    Image.new("RGB", (24, 24)).save(cats / "more" / "x.png")
    (root / "val" / "birds").mkdir()  # a val class that train lacks
    Image.new("RGB", (24, 24)).save(root / "val" / "birds" / "0.png")
    (root / "notes.txt").write_text("beside the splits")
    params = params_file(tmp_path, source="folder", root=str(root), num_classes=2)
    out = run_shard(params, tmp_path / "ws")
    train, val = read_manifest(out, "train"), read_manifest(out, "val")
    assert train["num_samples"] == 4 and val["num_samples"] == 4 and train["skipped"] == val["skipped"] == []
    ignored = {str(Path(e["path"]).relative_to(root)): e["reason"] for e in train["ignored"]}
    assert sorted(ignored) == [
        "notes.txt",
        "train/cats/.hidden.png",
        "train/cats/README",
        "train/cats/anim.gif",
        "train/cats/more",
        "train/cats/phone.heic",
    ]
    assert ignored["train/cats/anim.gif"].startswith("file kind .gif is not read (.bmp .jpeg")
    assert ignored["train/cats/README"].startswith("file kind (no extension) is not read")
    assert ignored["train/cats/.hidden.png"] == "hidden file"
    assert ignored["train/cats/more"] == "nested folder (1 files under it not read)"
    assert ignored["notes.txt"] == "a file beside the class folders is not read"
    assert val["ignored"] == [
        {
            "path": str(root / "val" / "birds"),
            "reason": f"class folder that {root / 'train'} lacks (1 files under it not read)",
        }
    ]
    summary = json.loads((tmp_path / "ws/results/shard/summary.json").read_text())
    assert summary["splits"]["train"]["num_ignored"] == 6 and summary["splits"]["val"]["num_ignored"] == 1


def _imagenet_tree(root: Path) -> None:
    for wnid in ("n01440764", "n01443537"):
        (root / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (24, 24)).save(root / "train" / wnid / f"{wnid}_1.JPEG")
    (root / "val").mkdir()
    for i in range(2):
        Image.new("RGB", (24, 24)).save(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")


@pytest.mark.parametrize(
    "labels, message",
    [
        (
            "ILSVRC2012_val_00000000.JPEG 1\nILSVRC2012_val_00000001.JPEG 2\n",
            r"line 2: label '2' is a class index outside 0\.\.1 \(2 classes in .*train\)",
        ),
        (
            "ILSVRC2012_val_00000000.JPEG n01440764\nILSVRC2012_val_00000001.JPEG n09999999\n",
            r"line 2: label 'n09999999' is a WordNet id not among the class folders of train/",
        ),
        (
            "ILSVRC2012_val_00000000.JPEG -1\nILSVRC2012_val_00000001.JPEG 0\n",
            r"line 1: label '-1' is a class index outside 0\.\.1",
        ),
        ("ILSVRC2012_val_00000000.JPEG\n", r"line 1: expected '<file> <label>', got 'ILSVRC2012_val_00000000.JPEG'"),
    ],
)
def test_imagenet_val_labels_outside_the_classes_are_refused_by_name(tmp_path, labels, message):
    root = tmp_path / "ILSVRC2012"
    _imagenet_tree(root)
    (root / "val.txt").write_text(labels)
    p = load_params(
        params_file(tmp_path, source="imagenet", root=str(root), num_classes=2, val_labels=str(root / "val.txt"))
    )
    with pytest.raises(SourceError, match=rf"data.val_labels='.*val.txt', {message}"):
        list_items(p.data, "val")


def test_imagenet_unknown_wnid_in_the_csv_and_extra_val_folders_are_refused_by_name(tmp_path):
    root = tmp_path / "ILSVRC2012"
    _imagenet_tree(root)
    (root / "LOC.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000000,n01440764 1 2 3 4\n"
        "ILSVRC2012_val_00000001,n04000000 1 2 3 4\n"
    )
    p = load_params(
        params_file(tmp_path, source="imagenet", root=str(root), num_classes=2, val_labels=str(root / "LOC.csv"))
    )
    with pytest.raises(SourceError, match=r"LOC.csv', line 3: label 'n04000000' is a WordNet id not among"):
        list_items(p.data, "val")
    for i, wnid in enumerate(("n01440764", "n01443537", "n02000000")):
        (root / "val" / wnid).mkdir()
        Image.new("RGB", (24, 24)).save(root / "val" / wnid / f"{i}.JPEG")
    with pytest.raises(
        SourceError,
        match=rf"{root / 'val'} has class folders \['n02000000'\] that "
        rf"{root / 'train'} lacks \(1\)",
    ):
        list_items(p.data, "val")


def test_a_postscript_file_renamed_jpg_never_reaches_ghostscript(tmp_path):
    eps = tmp_path / "photo.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n")
    with pytest.raises(UnidentifiedImageError, match="cannot identify image file"):
        load(eps)


def _tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_wds_samples_get_the_folder_sources_conversion_and_skip_list(tmp_path):
    """External shards are decoded at shard time like files: EXIF, 16-bit, alpha converted, upper-case extensions
    read, a bad sample listed (it used to reach training, which stopped with a bare StopIteration)."""
    png16(tmp_path / "deep.png")
    rgba(tmp_path / "logo.png")
    exif_rotated(tmp_path / "phone.jpg")
    files = {
        "deep": (tmp_path / "deep.png").read_bytes(),
        "logo": (tmp_path / "logo.png").read_bytes(),
        "phone": (tmp_path / "phone.jpg").read_bytes(),
    }
    plain = _encoded(Image.new("RGB", (48, 48), (0, 90, 200)), "PNG")
    _tar(
        tmp_path / "train.tar",
        [
            {"a.JPEG": files["phone"], "a.cls": b"0"},
            {"b.png": files["deep"], "b.cls": b"1"},
            {"c.png": files["logo"], "c.cls": b"0"},
            {"d.jpg": b"\xff\xd8\xff truncated", "d.cls": b"1"},
            {"e.png": plain},
            {"f.txt": b"text", "f.cls": b"1"},
            {"g.png": plain, "g.cls": b"1"},
        ],
    )
    _tar(tmp_path / "val.tar", [{"v0.png": plain, "v0.cls": b"0"}, {"v1.png": plain, "v1.cls": b"1"}])
    params = params_file(
        tmp_path,
        source="wds",
        num_classes=2,
        wds={"train": str(tmp_path / "train.tar"), "val": str(tmp_path / "val.tar")},
    )
    out = run_shard(params, tmp_path / "ws")
    m = read_manifest(out, "train")
    skipped = {s["path"].rsplit("#", 1)[1]: s["reason"] for s in m["skipped"]}
    assert sorted(skipped) == ["d", "e", "f"]
    assert skipped["e"].startswith("no integer class (cls)") and skipped["f"].startswith("no image field")
    assert m["num_samples"] == 4 and m["class_histogram"] == [2, 2]
    assert m["sources"] == [{"path": str(tmp_path / "train.tar"), "samples": 7, "sha256": m["sources"][0]["sha256"]}]
    stored = list(iter_split(out, "train"))
    p = load_params(params)
    for (_, img, _), name in zip(stored[:3], ("phone", "deep", "logo")):
        want = to_rgb(Image.open(io.BytesIO(files[name])), WHITE)
        assert np.array_equal(np.asarray(img), np.asarray(store_transform(want, "train", p.data.resolution)))


def test_wds_class_left_without_images_is_refused(tmp_path):
    plain = _encoded(Image.new("RGB", (48, 48)), "PNG")
    _tar(tmp_path / "train.tar", [{"a.png": plain, "a.cls": b"0"}, {"b.png": b"bad", "b.cls": b"1"}])
    _tar(tmp_path / "val.tar", [{"v0.png": plain, "v0.cls": b"0"}, {"v1.png": plain, "v1.cls": b"1"}])
    params = params_file(
        tmp_path,
        source="wds",
        num_classes=2,
        wds={"train": str(tmp_path / "train.tar"), "val": str(tmp_path / "val.tar")},
    )
    with pytest.raises(
        ValueError,
        match=r"shard train: class '1' kept no image: .*train.tar#b: "
        r"UnidentifiedImageError",
    ):
        run_shard(params, tmp_path / "ws")
    _tar(tmp_path / "train.tar", [{"a.png": plain, "a.cls": b"0"}, {"b.png": plain, "b.cls": b"7"}])
    with pytest.raises(SourceError, match=r"data.wds.train: .*train.tar#b has class 7, outside 0\.\.1"):
        run_shard(params, tmp_path / "ws")


# ------------------------------------------------------------------------------------------ all together
def test_a_folder_of_every_bad_file_loses_nothing(tmp_path, capsys):
    root = tmp_path / "photos"
    for c in ("a", "b["):  # "b[" + "/" + "]broken.jpg": a rich closing tag "[/]" in the path
        (root / c).mkdir(parents=True)
        for i in range(6):  # plain images, so each class has enough good ones besides the bad ones
            Image.new("RGB", (24, 24), (40 * i, 100, 200)).save(root / c / f"plain{i}.png")
    png16(root / "a" / "deep.png")
    exif_rotated(root / "a" / "phone.jpg")
    rgba(root / "a" / "logo [tag].png")
    cmyk(root / "b[" / "print.jpg")
    Image.new("RGB", (70, 70)).save(root / "b[" / "huge.png")
    (root / "b[" / "]broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (root / "b[" / "old [tag].png").write_bytes(b"\x89PNG truncated")
    (root / "b[" / "gone.png").symlink_to(root / "b[" / "deleted.png")
    # the limit stops huge.png (4,900 pixels) but not the 16-bit PNG, which is stored at 128 x 32 = 4,096
    params = params_file(
        tmp_path, {"max_image_pixels": 4500}, source="folder", root=str(root), num_classes=2, val_fraction=0.3
    )
    out = run_shard(params, tmp_path / "ws")
    manifests = [read_manifest(out, s) for s in ("train", "val")]
    skipped = {Path(s["path"]).name: s["reason"] for m in manifests for s in m["skipped"]}
    assert sorted(skipped) == ["]broken.jpg", "gone.png", "huge.png", "old [tag].png"]
    assert "No such file" in skipped["gone.png"] and "exceeds shard.max_image_pixels=4500" in skipped["huge.png"]
    stored = sum(m["num_samples"] for m in manifests)
    assert stored == (6 + 3) + (6 + 1), "every plain and every convertible file is stored"
    assert sum(1 for s in ("train", "val") for _ in iter_split(out, s)) == stored
    printed = capsys.readouterr().err  # logs go to stderr; names verbatim: no rich markup error, no "[tag]" swallowed
    for name, reason in skipped.items():
        assert f"  skipped {root / 'b[' / name}: {reason}\n" in printed
