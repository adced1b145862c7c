"""Data layer: readers for every layout, bad input that never aborts an ingest, lesion-grouped splits, the cache."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import HAM, ISIC2019_META, make_image, needs_ham, needs_isic2019
from dermsight.cli import main
from dermsight.data.cache import ImageCache, build_cache
from dermsight.data.download import DownloadRequest, isic_command
from dermsight.data.images import MAX_JPEG_SCANS, MAX_PIXELS, ImageError, load_rgb, probe, target_size
from dermsight.data.manifest import (
    MANIFEST_COLUMNS,
    build_manifest,
    combine,
    detect_format,
    load_manifest,
    read_isic2019,
    save_manifest,
)
from dermsight.data.problems import DataError
from dermsight.data.split import SplitConfig, check_split, groups, split_changes, split_fingerprint, split_manifest
from dermsight.domain.classes import ISIC2019

# --------------------------------------------------------------------------------------------- broken-file factory


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height``: a decompression bomb's calling card."""
    raw = zlib.compress(b"\x00" * 16)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


def truncated_jpeg(path: Path, seed: int = 1) -> Path:
    make_image(path, size=(160, 120), seed=seed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BROKEN = {
    "missing.jpg": None,  # listed in labels.csv, absent on disk
    "empty.jpg": lambda p: p.write_bytes(b""),
    "text.jpg": lambda p: p.write_text("this is not an image\n"),
    "truncated.jpg": truncated_jpeg,
    "garbage.jpg": lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8),
    "bomb.png": lambda p: png_claiming_size(p, 30000, 30000),
    "anim.gif": lambda p: Image.new("P", (8, 8)).save(p, format="GIF"),
}


@pytest.fixture
def messy_dataset(tmp_path: Path) -> Path:
    """A labels.csv folder with 4 good images, one of every kind of broken file and an unknown label."""
    root = tmp_path / "messy"
    rows = []
    for i, label in enumerate(["mel", "nv", "bcc", "Melanoma"]):
        make_image(root / "img" / f"good{i}.jpg", seed=i)
        rows.append((f"img/good{i}.jpg", label, f"L{i}"))
    make_image(root / "img" / "eczema.jpg", seed=9)
    rows.append(("img/eczema.jpg", "eczema", "L9"))
    for name, make in BROKEN.items():
        if make is not None:
            (root / "img").mkdir(parents=True, exist_ok=True)
            make(root / "img" / name)
        rows.append((f"img/{name}", "nv", f"B-{name}"))
    pd.DataFrame(rows, columns=["image", "label", "lesion_id"]).to_csv(root / "labels.csv", index=False)
    return root


# ------------------------------------------------------------------------------------------------------- images


def test_target_size_keeps_aspect_and_never_enlarges():
    assert target_size(600, 450, 224) == (299, 224)
    assert target_size(450, 600, 224) == (224, 299)
    assert target_size(200, 150, 224) == (200, 150)
    assert target_size(600, 450, None) == (600, 450)


def test_load_rgb_draft_matches_full_decode(tmp_path):
    p = make_image(tmp_path / "a.jpg", size=(600, 450))
    fast = load_rgb(p, 224, draft=True).astype(float)
    slow = load_rgb(p, 224, draft=False).astype(float)
    assert fast.shape == slow.shape == (224, 299, 3)
    assert np.abs(fast - slow).mean() < 4.0  # same picture; draft differs only by rounding and filtering


def test_load_rgb_applies_exif_orientation_and_converts_modes(tmp_path):
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = 255
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    im.save(tmp_path / "r.jpg", exif=exif)
    assert probe(tmp_path / "r.jpg").width == 40
    assert load_rgb(tmp_path / "r.jpg").shape == (80, 40, 3)
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(tmp_path / "t.png")
    out = load_rgb(tmp_path / "t.png")
    assert out.shape == (10, 10, 3) and out.min() == 255  # transparent -> white, not black
    Image.new("L", (12, 10), 7).save(tmp_path / "g.png")
    assert load_rgb((tmp_path / "g.png").read_bytes()).shape == (10, 12, 3)


def test_alpha_images_are_scaled_before_compositing_with_the_same_result(tmp_path):
    # Scaling first (Pillow premultiplies alpha) saves three full-size copies of a big RGBA PNG; the pixels match
    # compositing on white first and then scaling.
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (300, 400, 4), dtype=np.uint8)
    rgba[:, :150, 3] = 0  # a fully transparent band whose hidden colours must not bleed in
    rgba[:, 150:200, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    im = Image.fromarray(rgba, "RGBA")
    white = Image.new("RGB", im.size, (255, 255, 255))
    white.paste(im, mask=im.getchannel("A"))
    reference = np.array(white.resize((100, 75), Image.Resampling.BILINEAR, reducing_gap=None)).astype(int)
    out = load_rgb(tmp_path / "a.png", short_side=75)
    assert out.shape == (75, 100, 3) and np.abs(out.astype(int) - reference).max() <= 2
    assert out[:, :36].min() == 255  # the transparent band stays white


def test_webp_has_a_lower_pixel_limit_for_its_costlier_decoder(tmp_path):
    # A 2.5 KB lossless WebP of 8000x7999 raised a web worker's memory by 1 GB; 32 MP is WebP's limit.
    Image.new("RGB", (6000, 5400), (180, 120, 100)).save(tmp_path / "big.webp", lossless=True)
    assert (tmp_path / "big.webp").stat().st_size < 10_000
    with pytest.raises(ImageError, match=r"6000x5400 \(32 MP\), over the 32 MP limit for WEBP images"):
        load_rgb(tmp_path / "big.webp")
    Image.new("RGB", (600, 450), (180, 120, 100)).save(tmp_path / "ok.webp", lossless=True)
    assert load_rgb(tmp_path / "ok.webp", short_side=150).shape == (150, 200, 3)


def test_load_rgb_scales_wide_grey_images_instead_of_clipping_them(tmp_path):
    # Pillow's convert("RGB") clips 16-bit and 32-bit grey to 255: a mid-grey 16-bit photo decoded as a white frame.
    grey = np.tile(np.linspace(20, 230, 64), (48, 1)).round().astype(np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # full 16-bit range
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.tif")
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "gf.tif")  # floats in 0..1
    Image.fromarray(grey.astype(np.int32) * 257).save(tmp_path / "gi.tif")
    # Big-endian 16-bit ("MM" TIFF), which Pillow finds no extrema for: it was refused as corrupt.
    big_endian = (grey.astype(np.uint16) * 257).astype(">u2")
    Image.frombuffer("I;16B", (64, 48), big_endian.tobytes(), "raw", "I;16B", 0, 1).save(tmp_path / "g16be.tif")
    assert (tmp_path / "g16be.tif").read_bytes()[:2] == b"MM"
    dark = (grey // 16).astype(">u2")  # 16-bit values that all fit in 8 bits still scale as 16-bit (nearly black)
    Image.frombuffer("I;16B", (64, 48), dark.tobytes(), "raw", "I;16B", 0, 1).save(tmp_path / "dark16be.tif")
    assert load_rgb(tmp_path / "dark16be.tif").max() == 0
    for name in ("g16.png", "g16.tif", "g16be.tif", "gf.tif", "gi.tif"):
        out = load_rgb(tmp_path / name)
        assert out.shape == (48, 64, 3), name
        assert np.abs(out[..., 0].astype(int) - grey).max() <= 1, name
        assert (out[..., 0] == out[..., 2]).all()
    # Scaled down as grey, then made RGB: the same pixels as converting first.
    small = load_rgb(tmp_path / "g16.png", short_side=24)
    direct = np.array(
        Image.fromarray(grey).convert("RGB").resize((32, 24), Image.Resampling.BILINEAR, reducing_gap=None)
    )
    assert small.shape == (24, 32, 3) and np.abs(small.astype(int) - direct).max() <= 1


def test_load_rgb_refuses_jpegs_of_absurdly_many_scans(tmp_path):
    # Each progressive scan costs a pass over the whole image: thousands of tiny scans tie up a core for minutes.
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, format="JPEG", progressive=True)
    data = buf.getvalue()
    assert 1 < data.count(b"\xff\xda") <= MAX_JPEG_SCANS and load_rgb(data).shape == (64, 64, 3)
    last = data.rindex(b"\xff\xda")
    scan = data[last:-2]  # the last scan, repeated: libjpeg decodes every repeat
    bomb = data[:last] + scan * (MAX_JPEG_SCANS + 1) + data[-2:]
    with pytest.raises(ImageError, match=r"JPEG with \d+ scans \(at most 100\)"):
        load_rgb(bomb)
    (tmp_path / "bomb.jpg").write_bytes(bomb)
    with pytest.raises(ImageError, match="scans"):
        load_rgb(tmp_path / "bomb.jpg")


@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_jpeg_scans_are_counted_across_read_chunks(tmp_path, monkeypatch, chunk):
    # The count reads the file in chunks: a marker split between two of them (FF | DA) must still count, and the
    # handle must be left where decoding expects it (a good image decodes to the same pixels).
    buf = io.BytesIO()
    Image.fromarray(np.arange(48 * 40 * 3, dtype=np.uint8).reshape(40, 48, 3)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    expected = load_rgb(data)
    last = data.rindex(b"\xff\xda")
    bomb = data[:last] + data[last:-2] * (MAX_JPEG_SCANS + 1) + data[-2:]
    (tmp_path / "bomb.jpg").write_bytes(bomb)
    (tmp_path / "good.jpg").write_bytes(data)
    scans = bomb.count(b"\xff\xda")
    monkeypatch.setattr("dermsight.data.images._SCAN_CHUNK", chunk)
    with pytest.raises(ImageError, match=rf"JPEG with {scans} scans"):
        load_rgb(tmp_path / "bomb.jpg")
    assert np.array_equal(load_rgb(tmp_path / "good.jpg"), expected)
    assert np.array_equal(load_rgb(data), expected)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty.jpg", "empty file"),
        ("text.jpg", "not an image"),
        ("truncated.jpg", "truncated"),
        ("garbage.jpg", "corrupt|not an image"),
        ("bomb.png", r"over the \d+ MP limit|far larger than any photo"),
        ("anim.gif", "unsupported image format GIF"),
        ("missing.jpg", "not found"),
    ],
)
def test_bad_images_raise_one_line_reasons(tmp_path, name, reason):
    p = tmp_path / name
    if BROKEN[name] is not None:
        BROKEN[name](p)
    with pytest.raises(ImageError, match=reason):
        load_rgb(p, 64)
    assert MAX_PIXELS < 30000 * 30000


# ------------------------------------------------------------------------------------------------------ readers


def test_messy_folder_reports_every_bad_item_and_keeps_the_good(messy_dataset):
    ingest = build_manifest(messy_dataset, progress=False)
    m = ingest.manifest
    assert ingest.format == "labels-csv"
    assert list(m.columns) == list(MANIFEST_COLUMNS)
    assert sorted(Path(p).name for p in m["path"]) == ["good0.jpg", "good1.jpg", "good2.jpg", "good3.jpg"]
    assert m.set_index("image_id").loc["good3", "label"] == "mel"  # "Melanoma" resolved through the catalogue
    assert (m["width"] == 64).all() and (m["height"] == 48).all()
    reasons = {Path(p.item).name: p.reason for p in ingest.problems}
    assert set(reasons) == {*BROKEN, "eczema.jpg"}
    assert "unknown label 'eczema'" in reasons["eczema.jpg"]
    assert "not found" in reasons["missing.jpg"] and "truncated" in reasons["truncated.jpg"]


def test_cli_manifest_exit_code_and_problem_list(messy_dataset, tmp_path, capsys):
    out = tmp_path / "out" / "m.csv"
    assert main(["data", "manifest", str(messy_dataset), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "8 item(s) dropped" in err and "Traceback" not in err
    problems = pd.read_csv(out.with_name("m.problems.csv"))
    assert list(problems.columns) == ["item", "reason", "stage"] and len(problems) == 8
    assert len(load_manifest(out)) == 4


def test_manifest_never_overwrites_its_source_labels_and_is_written_whole(messy_dataset, tmp_path, monkeypatch):
    labels = messy_dataset / "labels.csv"
    before = labels.read_bytes()
    assert main(["data", "manifest", str(messy_dataset), "--out", str(labels)]) == 2
    assert labels.read_bytes() == before
    # A manifest written into the dataset folder is not one of its label files: writing it again is fine.
    assert main(["data", "manifest", str(messy_dataset), "--out", str(messy_dataset / "manifest.csv")]) == 1
    assert main(["data", "manifest", str(messy_dataset), "--out", str(messy_dataset / "manifest.csv")]) == 1
    # A write that fails half-way (a full disk) leaves the previous manifest as it was, and no stray file.
    out = messy_dataset / "manifest.csv"
    previous = out.read_bytes()

    def half_then_full(self, path, **kwargs):
        Path(path).write_text("path,label\nimg/0.jpg,n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_full)
    with pytest.raises(OSError):
        save_manifest(load_manifest(out), out)
    assert out.read_bytes() == previous and not list(messy_dataset.glob(".manifest.csv*"))


def test_split_changes_counts_moved_added_and_gone_images():
    before = pd.DataFrame({"path": ["a/1.jpg", "a/2.jpg", "a/3.jpg", "a/4.jpg"]})
    before["split"] = ["train", "val", "test", "excluded"]
    after = pd.DataFrame({"path": ["b/1.png", "b/2.png", "b/5.png", "b/4.png"]})  # ids are file names, not folders
    after["split"] = ["train", "test", "val", "train"]
    assert split_changes(before, after) == {"moved": 1, "added": 2, "gone": 1}  # 4 joined a split: added
    assert split_changes(before, before) == {"moved": 0, "added": 0, "gone": 0}


def test_an_id_that_names_several_images_is_a_problem_not_a_guess(tmp_path):
    # Which of two same-named files an id alone resolves to would depend on the folder walk, and the explicit row for
    # one of them would then be dropped as "listed more than once": such an id is a problem, not a guess.
    make_image(tmp_path / "x" / "ISIC_0024306.jpg", seed=1)
    make_image(tmp_path / "y" / "ISIC_0024306.jpg", seed=2)
    make_image(tmp_path / "y" / "ISIC_0000001.jpg", seed=3)
    pd.DataFrame(
        {"image": ["ISIC_0024306", "x/ISIC_0024306.jpg", "ISIC_0000001"], "label": ["nv", "bkl", "mel"]}
    ).to_csv(tmp_path / "labels.csv", index=False)
    ingest = build_manifest(tmp_path, verify="none", progress=False)
    kept = dict(zip(ingest.manifest["path"].map(lambda p: Path(p).relative_to(tmp_path).as_posix()),
                    ingest.manifest["label"], strict=True))  # fmt: skip
    assert kept == {"x/ISIC_0024306.jpg": "bkl", "y/ISIC_0000001.jpg": "mel"}
    assert [(p.item, p.reason) for p in ingest.problems] == [
        (
            "ISIC_0024306",
            f"2 different images under {tmp_path.resolve()} are named ISIC_0024306 (x/ISIC_0024306.jpg, "
            "y/ISIC_0024306.jpg): name the file with its folder in a labels.csv, or keep one of them",
        )
    ]
    # Byte-identical copies are one image (Kaggle's HAM10000 holds every image twice, in two folders).
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "ISIC_0000001.jpg").write_bytes((tmp_path / "y" / "ISIC_0000001.jpg").read_bytes())
    ingest = build_manifest(tmp_path, verify="none", progress=False)
    assert "mel" in set(ingest.manifest["label"]) and len(ingest.problems) == 1
    # The HAM10000 layout (ids in HAM10000_metadata.csv) is held to the same rule.
    (tmp_path / "labels.csv").unlink()
    pd.DataFrame(
        {"image_id": ["ISIC_0024306", "ISIC_0000001"], "dx": ["nv", "mel"], "lesion_id": ["HAM_1", "HAM_2"]}
    ).to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    ingest = build_manifest(tmp_path, verify="none", progress=False)
    assert list(ingest.manifest["image_id"]) == ["ISIC_0000001"]
    assert len(ingest.problems) == 1 and "2 different images under" in ingest.problems[0].reason


@pytest.mark.parametrize(
    ("encoding", "header", "sep"),
    [
        ("cp1252", "Image,Label,Lesion_ID", ","),
        ("utf-16", "image\tlabel\tlesion_id", "\t"),
        ("utf-8-sig", "IMAGE,label,lesion_id", ","),
    ],
)
def test_labels_from_spreadsheets_read_in_any_case_and_common_encodings(tmp_path, encoding, header, sep):
    # Excel's "CSV" is Windows-1252, its "Unicode text" UTF-16 with tabs, and headers are often capitalised.
    make_image(tmp_path / "img" / "café.jpg", seed=1)
    make_image(tmp_path / "img" / "b.jpg", seed=2)
    text = "\n".join([header, sep.join(["img/café.jpg", "mel", "HAM_1"]), sep.join(["img/b.jpg", "nv", "HAM_2"])])
    (tmp_path / "labels.csv").write_bytes((text + "\n").encode(encoding))
    ingest = build_manifest(tmp_path, verify="none", progress=False)
    assert list(ingest.manifest["label"]) == ["mel", "nv"] and not ingest.problems
    assert list(ingest.manifest["lesion_id"]) == ["HAM_1", "HAM_2"]


def test_late_windows_1252_bytes_and_lower_case_one_hot_ground_truth(tmp_path):
    # A first accented character after the first megabyte (or at the very end) is still Windows-1252.
    make_image(tmp_path / "img" / "a.jpg", seed=1)
    rows = "".join(f"img/missing{i:06d}.jpg,nv\n" for i in range(50_000))
    (tmp_path / "labels.csv").write_bytes(("image,label\n" + rows + "img/a.jpg,mel\n").encode() + b"# Ges\xe4\xdf\n")
    assert (tmp_path / "labels.csv").stat().st_size > 1 << 20
    ingest = build_manifest(tmp_path, verify="none", progress=False)  # files are not checked: all rows stay
    assert len(ingest.manifest) == 50_001 and ingest.manifest["label"].iloc[-1] == "mel"
    # ISIC's one-hot ground truth saved with lower-case class columns is still ISIC's.
    one_hot = tmp_path / "gt"
    make_image(one_hot / "ISIC_0000001.jpg", seed=2)
    cols = [c.lower() for c in ISIC2019.codes]
    pd.DataFrame([["ISIC_0000001", *[1.0 if c == "mel" else 0.0 for c in cols]]], columns=["image", *cols]).to_csv(
        one_hot / "ISIC_2019_Training_GroundTruth.csv", index=False
    )
    ingest = build_manifest(one_hot, verify="none", progress=False)
    assert list(ingest.manifest["label"]) == ["MEL"] and not ingest.problems


def test_score_columns_beside_a_label_are_not_a_one_hot_ground_truth(tmp_path):
    # evaluate's predictions.csv names its score columns by class code (ISIC 2018's one-hot columns in lower case):
    # with image and label present it is an image,label table, in any case ("Label").
    for i in range(3):
        make_image(tmp_path / f"{i}.jpg", seed=i)
    scores = {c: [0.2, 0.1, 0.3] for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")}
    table = pd.DataFrame({"image": ["0.jpg", "1.jpg", "2.jpg"], "Label": ["mel"] * 3, **scores})
    table.to_csv(tmp_path / "predictions.csv", index=False)
    assert detect_format(tmp_path / "predictions.csv") == "labels-csv"
    table.to_csv(tmp_path / "labels.csv", index=False)
    ingest = build_manifest(tmp_path, verify="none", progress=False)
    assert list(ingest.manifest["label"]) == ["mel"] * 3 and not ingest.problems
    # A UTF-16 file is recognised by its layout too, not only read.
    (tmp_path / "u16.csv").write_bytes("image\tlabel\n0.jpg\tnv\n".encode("utf-16"))
    assert detect_format(tmp_path / "u16.csv") == "labels-csv"


def test_a_dangling_link_among_same_named_images_is_no_image(tmp_path):
    # A git-annex/DataLad file not fetched yet is a link to nowhere: it must not stop the ingest.
    make_image(tmp_path / "a" / "ISIC_0000001.jpg")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ISIC_0000001.jpg").symlink_to(tmp_path / "annex" / "not-fetched")
    pd.DataFrame({"image": ["ISIC_0000001"], "label": ["nv"]}).to_csv(tmp_path / "labels.csv", index=False)
    ingest = build_manifest(tmp_path, verify="none", progress=False)
    assert [Path(p).parent.name for p in ingest.manifest["path"]] == ["a"] and not ingest.problems


def test_manifest_out_guard_covers_ground_truth_in_sub_folders(tmp_path):
    gt = tmp_path / "src" / "labels" / "ISIC_2019_Training_GroundTruth.csv"
    gt.parent.mkdir(parents=True)
    make_image(tmp_path / "src" / "ISIC_0000001.jpg")
    gt.write_text("image," + ",".join(ISIC2019.codes) + "\nISIC_0000001,1,0,0,0,0,0,0,0\n")
    before = gt.read_bytes()
    assert main(["data", "manifest", str(tmp_path / "src"), "--out", str(gt)]) == 2
    assert gt.read_bytes() == before


def test_csv_missing_required_column_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("image,diagnosis\na.jpg,mel\n")
    with pytest.raises(DataError, match="missing required column"):
        build_manifest(tmp_path / "labels.csv", fmt="labels-csv")
    assert main(["data", "manifest", str(tmp_path), "--format", "labels-csv", "--out", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing required column(s) label" in err and "Traceback" not in err


def test_unknown_layout_and_missing_source_are_clear_errors(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["data", "manifest", str(tmp_path), "--out", str(tmp_path / "m.csv")]) == 2
    assert "cannot tell the dataset layout" in capsys.readouterr().err
    assert main(["data", "manifest", str(tmp_path / "nope"), "--out", str(tmp_path / "m.csv")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    # Nothing usable is unusable input (exit 2), not a success; an empty manifest has nothing to split.
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "labels.csv").write_text("image,label\nmissing.jpg,nv\n")
    (tmp_path / "m.csv").write_text("path,label\nimg/a.jpg,nv\n")  # a manifest from an earlier, good run
    assert main(["data", "manifest", str(tmp_path / "only"), "--out", str(tmp_path / "m.csv")]) == 2
    assert "error: no usable image in" in capsys.readouterr().err
    assert (tmp_path / "m.csv").read_text() == "path,label\nimg/a.jpg,nv\n"  # not replaced by an empty one
    assert not (tmp_path / "m.problems.csv").exists()  # nor given a problem list of the failed run beside it
    (tmp_path / "empty.csv").write_text("path,label\n")
    assert main(["data", "split", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "s.csv")]) == 2
    assert "lists no images: nothing to split" in capsys.readouterr().err


def test_class_folders(tmp_path):
    root = tmp_path / "dermnet"
    for label, n in [("Melanoma", 2), ("nv", 3), ("Eczema Photos", 2)]:
        for i in range(n):
            make_image(root / label / f"{i}.jpg", seed=i)
    (root / "nv" / "README.txt").write_text("not an image")
    (root / "nv" / ".DS_Store").write_bytes(b"junk")
    assert detect_format(root) == "folders"
    ingest = build_manifest(root, progress=False)
    assert ingest.manifest["label"].value_counts().to_dict() == {"nv": 3, "mel": 2}
    reasons = " | ".join(p.reason for p in ingest.problems)
    assert "2 file(s) skipped: unknown label 'Eczema Photos'" in reasons and "not an image file name" in reasons
    assert len(ingest.problems) == 2


def _ham_layout(root: Path) -> None:
    """The official HAM10000 download: metadata CSV plus images split over two folders."""
    rows = []
    for i, (dx, lesion) in enumerate([("mel", "HAM_1"), ("mel", "HAM_1"), ("nv", "HAM_2"), ("akiec", "HAM_3")]):
        part = "HAM10000_images_part_1" if i < 2 else "HAM10000_images_part_2"
        make_image(root / part / f"ISIC_{i:07d}.jpg", seed=i)
        rows.append((lesion, f"ISIC_{i:07d}", dx, "histo", 50.0, "male", "back"))
    rows.append(("HAM_4", "ISIC_0000099", "bcc", "histo", 60.0, "female", "face"))  # image not downloaded
    cols = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    pd.DataFrame(rows, columns=cols).to_csv(root / "HAM10000_metadata.csv", index=False)


def test_ham10000_official_layout(tmp_path):
    _ham_layout(tmp_path)
    assert detect_format(tmp_path) == "ham10000"
    ingest = build_manifest(tmp_path, progress=False)
    m = ingest.manifest.set_index("image_id")
    assert len(m) == 4 and m.loc["ISIC_0000003", "label_ham7"] == "akiec"
    assert pd.isna(m.loc["ISIC_0000003", "label_isic2019"])  # akiec is AK or SCC: the metadata doesn't say
    assert m.loc["ISIC_0000000", "label_isic2019"] == "MEL" and m.loc["ISIC_0000000", "site"] == "back"
    assert [p.item for p in ingest.problems] == ["ISIC_0000099"]


def test_isic2019_layout_with_images(tmp_path):
    gt = pd.DataFrame({"image": ["ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4"]})
    for c in ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"):
        gt[c] = 0.0
    gt.loc[0, "SCC"] = gt.loc[1, "NV"] = gt.loc[2, "MEL"] = 1.0
    gt.loc[3, ["MEL", "NV"]] = 1.0  # two classes marked: reported, dropped
    gt.to_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.DataFrame(
        {
            "image": ["ISIC_1", "ISIC_2"],
            "age_approx": ["40", "55"],
            "anatom_site_general": ["head", ""],
            "lesion_id": ["BCN_1", "BCN_1"],
            "sex": ["male", "female"],
        }
    ).to_csv(tmp_path / "ISIC_2019_Training_Metadata.csv", index=False)
    for i in (1, 2, 3, 4):
        make_image(tmp_path / "ISIC_2019_Training_Input" / f"ISIC_{i}.jpg", seed=i)
    ingest = build_manifest(tmp_path, progress=False)
    m = ingest.manifest.set_index("image_id")
    assert ingest.format == "isic2019"
    assert m.loc["ISIC_1", "label"] == "SCC" and m.loc["ISIC_1", "label_ham7"] == "akiec"
    assert m.loc["ISIC_1", "lesion_id"] == "BCN_1" and m.loc["ISIC_1", "age"] == "40"
    assert pd.isna(m.loc["ISIC_3", "lesion_id"])
    assert [p.item for p in ingest.problems] == ["ISIC_4"] and "2 classes" in ingest.problems[0].reason


def test_labels_csv_finds_images_named_by_id_alone(tmp_path):
    """Label files often give bare ids (as ISIC's CSVs do), or omit the images/ sub-folder: found by file name."""
    make_image(tmp_path / "images" / "ISIC_1.jpg", seed=1)
    make_image(tmp_path / "images" / "ISIC_2.png", fmt="PNG", seed=2)
    make_image(tmp_path / "img.2019.003.jpg", seed=3)  # an id with dots is not a file suffix
    make_image(tmp_path / "ISIC_4.jpg", seed=4)
    rows = [("ISIC_1", "MEL"), ("ISIC_2.png", "Melanocytic nevi"), ("img.2019.003", "bcc"), ("ISIC_4.jpg", "nv")]
    rows.append(("ISIC_5", "nv"))  # no such image anywhere: reported, not silently lost
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(tmp_path / "labels.csv", index=False)
    ingest = build_manifest(tmp_path, progress=False)
    m = ingest.manifest.set_index("image_id")
    assert m["label_ham7"].to_dict() == {"ISIC_1": "mel", "ISIC_2": "nv", "img.2019.003": "bcc", "ISIC_4": "nv"}
    assert Path(m.loc["ISIC_2", "path"]) == (tmp_path / "images" / "ISIC_2.png").resolve()
    assert [(Path(p.item).name, "not found" in p.reason) for p in ingest.problems] == [("ISIC_5", True)]


def test_images_behind_folder_links_are_found_once_and_a_link_loop_ends(tmp_path):
    """A dataset assembled from links to where the images live (a shared disk): ids are found through the links,
    and a link back up the tree is walked once, not forever."""
    store = tmp_path / "store"
    make_image(store / "batch1" / "ISIC_1.jpg", seed=1)
    make_image(store / "batch2" / "ISIC_2.jpg", seed=2)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "b1").symlink_to(store / "batch1", target_is_directory=True)
    (data / "images" / "b2").symlink_to(store / "batch2", target_is_directory=True)
    (data / "images" / "loop").symlink_to(data, target_is_directory=True)
    pd.DataFrame([("ISIC_1", "mel"), ("ISIC_2", "nv")], columns=["image", "label"]).to_csv(
        data / "labels.csv", index=False
    )
    ingest = build_manifest(data, progress=False)
    assert ingest.manifest.set_index("image_id")["label_ham7"].to_dict() == {"ISIC_1": "mel", "ISIC_2": "nv"}
    assert not ingest.problems
    # Class folders that are links, likewise; a link inside a class folder back to the root or into another class
    # does not file the other class's images under this one's label.
    classes = tmp_path / "classes"
    classes.mkdir()
    (classes / "melanoma").symlink_to(store / "batch1", target_is_directory=True)
    make_image(classes / "nevus" / "sub" / "n1.jpg", seed=5)
    (store / "batch1" / "up").symlink_to(classes, target_is_directory=True)
    (store / "batch1" / "side").symlink_to(classes / "nevus" / "sub", target_is_directory=True)
    m = build_manifest(classes, progress=False).manifest
    names = m["path"].map(lambda p: Path(p).name)
    assert sorted(zip(names, m["label"], strict=True)) == [("ISIC_1.jpg", "mel"), ("n1.jpg", "nv")]


def test_evaluation_with_no_usable_row_says_why(tmp_path):
    from dermsight.evaluation.run import read_labelled

    make_image(tmp_path / "a.jpg")
    pd.DataFrame({"image": ["a.jpg", "b.jpg"], "label": ["eczema", "mel"]}).to_csv(tmp_path / "labels.csv")
    with pytest.raises(DataError, match=r"(?s)no labelled images.*unknown label 'eczema'.*not found"):
        read_labelled(tmp_path)


@pytest.mark.parametrize("name", ["ISIC2018_Task3_Test_GroundTruth.csv", "labels.csv"])
def test_isic2018_one_hot_ground_truth(tmp_path, name):
    """ISIC 2018 Task 3 (HAM10000's challenge) marks akiec as one class, AKIEC; a labels.csv may be one-hot too."""
    gt = pd.DataFrame({"image": ["ISIC_1", "ISIC_2", "ISIC_3"]})
    for c in ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"):
        gt[c] = 0.0
    gt.loc[0, "AKIEC"] = gt.loc[1, "VASC"] = 1.0  # ISIC_3 marks nothing: reported, dropped
    gt.to_csv(tmp_path / name, index=False)
    for i in (1, 2, 3):
        make_image(tmp_path / "ISIC2018_Task3_Test_Input" / f"ISIC_{i}.jpg", seed=i)
    assert detect_format(tmp_path / name) == "isic2019"
    ingest = build_manifest(tmp_path, progress=False)
    m = ingest.manifest.set_index("image_id")
    assert m["label"].to_dict() == {"ISIC_1": "akiec", "ISIC_2": "vasc"}
    assert m["label_ham7"].to_dict() == {"ISIC_1": "akiec", "ISIC_2": "vasc"}
    assert pd.isna(m.loc["ISIC_1", "label_isic2019"]) and m.loc["ISIC_2", "label_isic2019"] == "VASC"
    assert [p.item for p in ingest.problems] == ["ISIC_3"] and "0 classes" in ingest.problems[0].reason


def test_one_hot_csv_with_neither_class_set_is_a_clear_error(tmp_path):
    pd.DataFrame({"image": ["a"], "MEL": [1], "NV": [0]}).to_csv(tmp_path / "GroundTruth.csv", index=False)
    with pytest.raises(DataError, match=r"missing required column.*ISIC 2018: MEL,NV,BCC,AKIEC"):
        read_isic2019(tmp_path / "GroundTruth.csv")


def test_isic_archive_layout(tmp_path):
    pd.DataFrame(
        {
            "isic_id": ["ISIC_9000001", "ISIC_9000002", "ISIC_9000003"],
            "diagnosis_1": ["Malignant", "Benign", "Benign"],
            "diagnosis_3": ["Melanoma Invasive", "Nevus", "Something rare"],
            "lesion_id": ["IL_1", "IL_2", "IL_3"],
            "patient_id": ["IP_1", "IP_1", "IP_2"],
        }
    ).to_csv(tmp_path / "metadata.csv", index=False)
    for i in (1, 2, 3):
        make_image(tmp_path / f"ISIC_900000{i}.jpg", seed=i)
    ingest = build_manifest(tmp_path, progress=False)
    assert ingest.format == "isic-archive"
    assert dict(zip(ingest.manifest["image_id"], ingest.manifest["label"], strict=True)) == {
        "ISIC_9000001": "mel",
        "ISIC_9000002": "nv",
    }
    assert "unknown label 'Something rare'" in ingest.problems[0].reason


@needs_isic2019
def test_real_isic2019_csvs_parse_and_every_row_is_reported_missing():
    ingest = read_isic2019(ISIC2019_META)
    assert ingest.rows_read == 25331 and len(ingest.manifest) == 0
    assert len(ingest.problems) == 25331
    assert all("no images at all" in p.reason for p in ingest.problems[:5])
    counts = build_manifest(ISIC2019_META, progress=False).labels_read
    assert counts == {
        "NV": 12875,
        "MEL": 4522,
        "BCC": 3323,
        "BKL": 2624,
        "AK": 867,
        "SCC": 628,
        "VASC": 253,
        "DF": 239,
    }


# -------------------------------------------------------------------------------------------------------- splits


def _toy_manifest(n_lesions=300, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for les in range(n_lesions):
        label = rng.choice(["nv", "mel", "bkl", "df"], p=[0.6, 0.2, 0.15, 0.05])
        patient = f"P{les // 3}" if les % 5 == 0 else None  # some lesions share a patient
        for k in range(rng.integers(1, 4)):
            rows.append(
                {
                    "path": f"/x/{les}_{k}.jpg",
                    "image_id": f"{les}_{k}",
                    "label": label,
                    "label_ham7": label,
                    "lesion_id": f"L{les}",
                    "patient_id": patient,
                }
            )
    return pd.DataFrame(rows)


def test_groups_join_lesions_through_patients():
    m = pd.DataFrame({"lesion_id": ["a", "a", "b", "c", None], "patient_id": [None, "p", "p", None, None]})
    g = groups(m)
    assert g[0] == g[1] == g[2] and g[3] != g[0] and g[4] not in (g[0], g[3])


def test_split_is_grouped_stratified_and_deterministic():
    m = _toy_manifest()
    a = split_manifest(m, SplitConfig(seed=3))
    b = split_manifest(m, SplitConfig(seed=3))
    c = split_manifest(m, SplitConfig(seed=4))
    assert a["split"].tolist() == b["split"].tolist() and a["split"].tolist() != c["split"].tolist()
    assert check_split(a) == []
    share = a["split"].value_counts(normalize=True)
    assert abs(share["test"] - 0.15) < 0.05 and abs(share["val"] - 0.15) < 0.05
    g = groups(a)
    assert (pd.Series(a["split"].to_numpy()).groupby(g).nunique() == 1).all()
    dev = a[a["split"] != "test"]
    assert set(dev["fold"]) == {0, 1, 2, 3, 4} and (a.loc[a["split"] == "test", "fold"] == -1).all()
    assert (pd.Series(dev["fold"].to_numpy()).groupby(groups(dev)).nunique() == 1).all()


def test_split_rejects_impossible_fractions():
    with pytest.raises(ValueError, match="val"):
        split_manifest(_toy_manifest(), SplitConfig(val=0.6, test=0.5))
    # Too few images per class for the parts the fractions need: said in the options' terms, not sklearn's.
    small = pd.DataFrame({"path": [f"/x/{i}.jpg" for i in range(40)], "label": ["nv", "mel"] * 20})
    small["label_ham7"], small["lesion_id"] = small["label"], [f"L{i}" for i in range(40)]
    with pytest.raises(ValueError, match=r"20 stratified parts, but no class has 20 images \(the largest has 19\)"):
        split_manifest(small.head(38), SplitConfig())
    assert set(split_manifest(small.head(38), SplitConfig(val=0.2, test=0.2))["split"]) == {"train", "val", "test"}


def test_split_fingerprint_follows_the_assignment_not_the_folder_or_row_order():
    df = pd.DataFrame(
        {
            "path": [f"/a/images/ISIC_{i}.jpg" for i in range(5)],
            "split": ["train", "train", "val", "test", "excluded"],
            "label_ham7": ["nv", "mel", "nv", None, "bcc"],
        }
    )
    fp = split_fingerprint(df)
    assert len(fp) == 16 and fp == split_fingerprint(df.iloc[::-1])  # row order does not matter
    assert fp == split_fingerprint(df.assign(path=df["path"].str.replace("/a/images", "C:\\data")))  # nor folders
    assert fp == split_fingerprint(df.assign(image_id=[f"ISIC_{i}" for i in range(5)]))  # ids key rows when given
    assert fp != split_fingerprint(df.assign(split=["train", "val", "train", "test", "excluded"]))
    assert fp == split_fingerprint(df.assign(split=["train", "train", "val", "test", "val"]).head(4))  # 4 is excluded
    # Rows without a label in the taxonomy are not counted when a label column is named, as training does not.
    assert split_fingerprint(df, "label_ham7") == split_fingerprint(df.drop(index=3), "label_ham7") != fp
    with pytest.raises(ValueError, match="path or image_id"):
        split_fingerprint(df[["split"]])


@needs_ham
def test_real_ham10000_split_has_no_lesion_in_two_splits_and_every_class_everywhere():
    m = build_manifest(HAM, verify="none", progress=False).manifest
    assert len(m) == 10015 and m["lesion_id"].nunique() == 7470
    s = split_manifest(m, SplitConfig(seed=0))
    per_lesion = s.groupby("lesion_id")["split"].nunique()
    assert (per_lesion == 1).all(), "a lesion appears in two splits"
    for split in ("train", "val", "test"):
        assert set(s.loc[s["split"] == split, "label_ham7"]) == set(m["label_ham7"])
    share = s["split"].value_counts(normalize=True)
    assert abs(share["test"] - 0.15) < 0.01 and abs(share["val"] - 0.15) < 0.01


# --------------------------------------------------------------------------------------------------------- cache


def test_cache_round_trip_reuse_and_failures(tmp_path):
    paths = [make_image(tmp_path / f"{i}.jpg", size=(120, 90), seed=i) for i in range(5)]
    paths.append(tmp_path / "gone.jpg")
    m = pd.DataFrame({"path": [str(p) for p in paths], "label": ["nv"] * 6})
    res = build_cache(m, 60, root=tmp_path / "c", progress=False)
    assert not res.reused and [p.item for p in res.problems] == [str(tmp_path / "gone.jpg")]
    cache = res.cache
    assert len(cache) == 6 and cache[0].shape == (60, 80, 3) and not cache.ok(5)
    np.testing.assert_array_equal(cache[2], load_rgb(paths[2], 60))
    with pytest.raises(KeyError):
        cache[5]
    again = build_cache(m, 60, root=tmp_path / "c", progress=False)
    assert again.reused and again.cache.folder == cache.folder and len(again.problems) == 1
    reopened = ImageCache(cache.folder)
    np.testing.assert_array_equal(reopened[cache.row_of(str(paths[4]))], cache[4])
    assert build_cache(m, 40, root=tmp_path / "c", progress=False).cache.folder != cache.folder


def test_cli_split_and_cache(tmp_path, capsys):
    m = _toy_manifest(120)
    for i, p in enumerate(m["path"]):
        m.loc[i, "path"] = str(make_image(tmp_path / "imgs" / Path(p).name, size=(40, 30), seed=i))
    m.to_csv(tmp_path / "m.csv", index=False)
    assert main(["data", "split", str(tmp_path / "m.csv"), "--out", str(tmp_path / "s.csv"), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "images per class" in out and "test" in out
    assert set(load_manifest(tmp_path / "s.csv")["split"]) == {"train", "val", "test"}
    bad = ["data", "split", str(tmp_path / "m.csv"), "--out", str(tmp_path / "t.csv"), "--label", "nosuch"]
    assert main(bad) == 2 and "no column 'nosuch'" in capsys.readouterr().err
    args = ["data", "cache", str(tmp_path / "s.csv"), "--size", "32", "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0 and "images/s" in capsys.readouterr().out
    umask = os.umask(0o022)
    os.umask(umask)
    (folder,) = [p for p in (tmp_path / "c").iterdir() if p.is_dir()]
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # a plain mkdir's, not mkdtemp's 0700
    assert main(args) == 0 and "reusing cache" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------ download


def test_download_builds_the_official_isic_cli_command(tmp_path, capsys):
    req = DownloadRequest(tmp_path / "isic", search="diagnosis_3:Nevus", collections="65", limit=10)
    assert isic_command(req) == [
        "isic",
        "image",
        "download",
        "--search",
        "diagnosis_3:Nevus",
        "--collections",
        "65",
        "--limit",
        "10",
        str(tmp_path / "isic"),
    ]
    assert isic_command(DownloadRequest(Path("x"))) == ["isic", "image", "download", "x"]
    assert main(["data", "download", "--out", str(tmp_path / "d"), "--limit", "5", "--dry-run"]) == 0
    assert "isic image download --limit 5" in capsys.readouterr().out


def test_download_without_isic_cli_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `isic` executable anywhere
    assert main(["data", "download", "--out", str(tmp_path / "d"), "--limit", "5"]) == 2
    err = capsys.readouterr().err
    assert "isic-cli is not installed" in err and "pip install" in err and "Traceback" not in err


def labelled_folder(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A labels.csv folder of synthetic images: (image id, label, lesion id) per row."""
    for i, (image, _, _) in enumerate(rows):
        make_image(root / "images" / f"{image}.png", seed=i)
    pd.DataFrame(rows, columns=["image", "label", "lesion_id"]).to_csv(root / "labels.csv", index=False)
    return root


def test_several_sources_make_one_manifest_that_keeps_each_rows_source(tmp_path, capsys):
    a = labelled_folder(tmp_path / "clinic_a", [(f"a{i}", ("nv", "mel")[i % 2], f"A{i // 2}") for i in range(6)])
    b = labelled_folder(tmp_path / "clinic_b", [(f"b{i}", "nv", f"B{i}") for i in range(3)])
    out = tmp_path / "m.csv"
    assert main(["data", "manifest", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "9 kept" in printed and "clinic_a" in printed and "clinic_b" in printed  # counts by source
    m = load_manifest(out)
    assert m.groupby("source").size().to_dict() == {"labels-csv:clinic_a": 6, "labels-csv:clinic_b": 3}
    # A folder read twice is one source: its rows are kept once and the repeats reported.
    twice = combine([build_manifest(a, verify="none"), build_manifest(a, verify="none")])
    assert len(twice.manifest) == 6 and sum("more than one source" in p.reason for p in twice.problems) == 6
    # Two sources with the same folder name stay apart.
    same_name = labelled_folder(tmp_path / "other" / "clinic_b", [(f"c{i}", "mel", f"C{i}") for i in range(2)])
    both = combine([build_manifest(b, verify="none"), build_manifest(same_name, verify="none")]).manifest
    assert both["source"].nunique() == 2


def test_a_split_of_several_sources_spreads_each_sources_classes_over_the_parts():
    rows = [
        {"path": f"/d/{s}/{c}{i}.jpg", "label": c, "label_ham7": c, "lesion_id": f"{s}{c}{i}", "source": s}
        for s, n in (("big", 200), ("small", 40))
        for c in ("nv", "mel")
        for i in range(n)
    ]
    df = split_manifest(pd.DataFrame(rows), SplitConfig(val=0.2, test=0.2, seed=0))
    shares = pd.crosstab([df["source"], df["label"]], df["split"], normalize="index")
    # Each source's classes split 60/20/20 (within one group of 5 of a stratum), not just the pooled classes.
    assert ((shares - pd.Series({"train": 0.6, "val": 0.2, "test": 0.2})).abs() <= 0.05).all().all()
    # One source gives exactly the split the classes alone give.
    one = pd.DataFrame([r for r in rows if r["source"] == "big"])
    alone = split_manifest(one.drop(columns="source"), SplitConfig(val=0.2, test=0.2, seed=0))
    assert (split_manifest(one, SplitConfig(val=0.2, test=0.2, seed=0))["split"] == alone["split"]).all()


def test_scan_markers_inside_metadata_are_not_counted_as_scans(tmp_path):
    # EXIF, XMP and ICC segments are data: their bytes can hold FF DA anywhere. A photo with 151 of them in a
    # comment segment is one scan, not a scan bomb; the segments before the first scan are stepped over by length.
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 48, 3), 140, np.uint8)).save(buf, format="JPEG")
    data = buf.getvalue()
    payload = b"\xff\xda" * 151
    comment = b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
    tagged = data[:2] + comment + data[2:]
    assert tagged.count(b"\xff\xda") == 152
    assert load_rgb(tagged).shape == (64, 48, 3)
    # ... while real scans after the first still count.
    last = tagged.rindex(b"\xff\xda")
    bomb = tagged[:last] + tagged[last:-2] * (MAX_JPEG_SCANS + 1) + tagged[-2:]
    with pytest.raises(ImageError, match=rf"JPEG with {MAX_JPEG_SCANS + 1} scans"):
        load_rgb(bomb)


# ------------------------------------------------------------------------------------------ squashed sources


def test_aspect_ratios_parse_and_stretch_the_shorter_way():
    from dermsight.data.aspect import parse_aspect, restored_size

    assert parse_aspect("4:3") == pytest.approx(4 / 3) == parse_aspect("4/3") and parse_aspect("1.5") == 1.5
    for bad in ("4:0", "0", "-2", "wide", "nan"):
        with pytest.raises(ValueError, match="aspect ratio"):
            parse_aspect(bad)
    assert restored_size(256, 256, 4 / 3) == (341, 256)  # a squashed 4:3 frame: widened, never shrunk
    assert restored_size(400, 100, 2.0) == (400, 200)  # wider than the ratio: heightened
    assert restored_size(300, 225, 4 / 3) == (300, 225)  # already right: unchanged


def test_restore_aspect_writes_stretched_copies_once_and_drops_unreadable_files(tmp_path):
    from dermsight.data.aspect import restore_aspect

    make_image(tmp_path / "a.jpg", size=(60, 60), color=(200, 120, 90), seed=1)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    manifest = pd.DataFrame({"path": [str(tmp_path / "a.jpg"), str(tmp_path / "bad.jpg")], "image_id": ["a", "b"]})
    out, problems = restore_aspect(manifest, 4 / 3, tmp_path / "root", progress=False)
    assert list(out["image_id"]) == ["a"] and [p.item for p in problems] == [str(tmp_path / "bad.jpg")]
    copy = Path(out["path"][0])
    assert copy.parent.parent == tmp_path / "root" and (out["width"][0], out["height"][0]) == (80, 60)
    with Image.open(copy) as im:
        assert im.size == (80, 60) and im.format == "PNG"
        # Stretched, not cropped or padded: the left and right edges still hold the original's edge colours.
        stretched = np.asarray(im.convert("RGB"), dtype=np.int16)
    original = load_rgb(tmp_path / "a.jpg").astype(np.int16)
    assert np.abs(stretched[:, 0] - original[:, 0]).mean() < 12
    written = copy.stat().st_mtime_ns
    again, _ = restore_aspect(manifest.iloc[:1], 4 / 3, tmp_path / "root", progress=False)
    assert again["path"][0] == str(copy) and copy.stat().st_mtime_ns == written  # reused, not rewritten


def test_data_manifest_display_aspect_points_at_stretched_copies(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DERMSIGHT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "squashed"
    for i in range(2):
        make_image(src / f"{i}.jpg", size=(64, 64), color=(180, 100 + 40 * i, 90), seed=i)
    pd.DataFrame({"image": ["0.jpg", "1.jpg"], "label": ["nv", "mel"]}).to_csv(src / "labels.csv", index=False)
    assert (
        main(["data", "manifest", str(src), "--out", str(tmp_path / "m.csv"), "--display-aspect", "squashed=4:3"]) == 0
    )
    m = pd.read_csv(tmp_path / "m.csv")
    assert list(m["width"]) == [85, 85] and list(m["height"]) == [64, 64]
    assert all(Path(p).is_relative_to(tmp_path / "cache") for p in m["path"])
    for bad in ("other=4:3", "squashed=4:0", "squashed"):
        assert main(["data", "manifest", str(src), "--out", str(tmp_path / "x.csv"), "--display-aspect", bad]) == 2
        assert "--display-aspect" in capsys.readouterr().err


def test_an_image_pillow_refuses_to_open_is_one_problem_not_a_failed_dataset(tmp_path):
    # A PNG whose compressed text chunk holds 2 MB of metadata: Pillow raises ValueError while opening it (over its
    # 1 MB `MAX_TEXT_CHUNK`), which stopped `data manifest`, `predict` and the web app as a whole.
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "x" * 2_000_000, zip=True)
    make_image(tmp_path / "nv" / "good.jpg")
    Image.fromarray(np.full((150, 200, 3), 120, np.uint8)).save(tmp_path / "nv" / "meta.png", pnginfo=info)
    for read in (load_rgb, probe):
        with pytest.raises(ImageError, match="embedded text"):
            read(tmp_path / "nv" / "meta.png")
    for verify in ("header", "full"):  # the header alone, or every pixel
        ingest = build_manifest(tmp_path, verify=verify, progress=False)
        assert [Path(p).name for p in ingest.manifest["path"]] == ["good.jpg"]
        assert [(Path(p.item).name, "embedded text" in p.reason) for p in ingest.problems] == [("meta.png", True)]


def test_labels_csv_rows_without_an_image_are_listed_not_lost(tmp_path):
    make_image(tmp_path / "a.jpg")
    (tmp_path / "labels.csv").write_text("image,label\na.jpg,nv\n,mel\n   ,bkl\n")
    ingest = build_manifest(tmp_path, verify="none", progress=False)
    assert list(ingest.manifest["label"]) == ["nv"] and ingest.rows_read == 3
    assert [(p.item, p.reason) for p in ingest.problems] == [
        ("labels.csv, data row 2 (label mel)", "no image named in the image column"),
        ("labels.csv, data row 3 (label bkl)", "no image named in the image column"),
    ]
