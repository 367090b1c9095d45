"""split: validation with reasons, stratification, reproducibility, duplicates and the too-few rule."""

import collections
import shutil
import zlib

import pytest
from PIL import Image

from imgsim.errors import ImgsimError
from imgsim.manifest import Manifest
from imgsim.split import SplitConfig, split_dataset
from tests.conftest import CLASSES, photo


def test_every_bad_file_is_rejected_with_its_reason(image_folder):
    root, bad = image_folder
    manifest = split_dataset(SplitConfig(data_dir=str(root)))
    reasons = {r.path: r.reason for r in manifest.rejected}
    assert set(reasons) == set(bad)
    for path, expected in bad.items():
        assert expected in reasons[path], (path, reasons[path])


def test_good_files_are_kept_including_odd_formats_and_nested_folders(image_folder):
    root, _ = image_folder
    manifest = split_dataset(SplitConfig(data_dir=str(root)))
    paths = {i.path: i for i in manifest.items}
    for kept in ["circle/rgba.png", "circle/palette.png", "circle/cmyk.jpg", "circle/sixteen.png",
                 "square/nested/deeper/photo.webp", "square/nested/bitmap.bmp", "stripes/anim.gif"]:
        assert kept in paths
    assert paths["square/nested/deeper/photo.webp"].label == "square"
    assert not any(p.startswith(".") or "/." in p for p in paths)  # hidden files and folders skipped
    assert manifest.classes == list(CLASSES)


def test_split_is_stratified_per_class(image_folder):
    root, _ = image_folder
    # The fixture's synthetic shapes are near copies of each other to a perceptual hash (and would be split as
    # groups): stratification is checked on single images.
    manifest = split_dataset(SplitConfig(data_dir=str(root), test_ratio=0.25, eval_ratio=0.1, near_duplicate_distance=-1))
    counts = collections.Counter((i.label, i.split) for i in manifest.items)
    for label in CLASSES:
        total = sum(counts[(label, s)] for s in ("train", "test", "eval"))
        assert counts[(label, "test")] == pytest.approx(total * 0.25, abs=1.5)
        assert counts[(label, "eval")] >= 1 and counts[(label, "train")] >= total // 2


def test_same_seed_same_manifest_and_other_seed_differs(image_folder, tmp_path):
    root, _ = image_folder
    first = split_dataset(SplitConfig(data_dir=str(root), seed=1))
    again = split_dataset(SplitConfig(data_dir=str(root), seed=1))
    other = split_dataset(SplitConfig(data_dir=str(root), seed=2))
    assert first.items == again.items
    assert [i.split for i in first.items] != [i.split for i in other.items]
    loaded = Manifest.load(first.save(tmp_path / "split"))
    assert loaded.items == first.items and loaded.rejected == first.rejected


def test_exact_duplicates_share_a_split_even_across_classes(image_folder):
    root, _ = image_folder
    shutil.copy(root / "circle" / "001.png", root / "square" / "copied-from-circle.png")
    for seed in range(5):
        manifest = split_dataset(SplitConfig(data_dir=str(root), seed=seed))
        by_hash = collections.defaultdict(set)
        for item in manifest.items:
            by_hash[item.sha256].add(item.split)
        assert all(len(splits) == 1 for splits in by_hash.values())


def test_class_with_too_few_images_is_named(image_folder):
    root, _ = image_folder
    (root / "tiny").mkdir()
    shutil.copy(root / "circle" / "000.png", root / "tiny" / "only.png")
    with pytest.raises(ImgsimError, match="class 'tiny' has 1 usable image"):
        split_dataset(SplitConfig(data_dir=str(root)))


def test_class_with_no_valid_image_is_named(image_folder):
    root, _ = image_folder
    (root / "broken").mkdir()
    (root / "broken" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(ImgsimError, match="class 'broken' has 0 usable image"):
        split_dataset(SplitConfig(data_dir=str(root)))


def test_missing_or_empty_root_and_bad_ratios_are_clear(tmp_path):
    with pytest.raises(ImgsimError, match="does not exist"):
        split_dataset(SplitConfig(data_dir=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgsimError, match="no class subfolders"):
        split_dataset(SplitConfig(data_dir=str(tmp_path / "empty"), labels="folders"))
    with pytest.raises(ImgsimError, match="found no usable images"):
        split_dataset(SplitConfig(data_dir=str(tmp_path / "empty")))
    with pytest.raises(ImgsimError, match="sum to less than 1"):
        split_dataset(SplitConfig(data_dir=str(tmp_path), test_ratio=0.6, eval_ratio=0.5))


def test_unreadable_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ImgsimError, match="cannot read the manifest"):
        Manifest.load(tmp_path)


def test_a_symlinked_class_folder_is_reported_not_followed(image_folder, tmp_path):
    root, _ = image_folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.png").write_bytes((root / "circle" / "000.png").read_bytes())
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    manifest = split_dataset(SplitConfig(data_dir=str(root)))
    assert "linked" not in manifest.classes
    assert any(r.path == "linked" and "symlinked class folder" in r.reason for r in manifest.rejected)


def test_near_copies_share_a_split_whatever_the_seed(tmp_path):
    root = tmp_path / "photos"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(12):
            photo(zlib.crc32(f"{label}-{i}".encode())).save(root / label / f"{i:02d}.png")
    originals = [(label, i) for label in ("a", "b") for i in range(0, 12, 3)]
    for label, i in originals:  # a re-encoded and a half-size copy of every third image
        src = Image.open(root / label / f"{i:02d}.png")
        src.convert("RGB").save(root / label / f"{i:02d}-copy.jpg", quality=80)
        src.resize((48, 48)).save(root / label / f"{i:02d}-small.png")
    separated = 0
    for seed in range(8):
        with_copies = split_dataset(SplitConfig(data_dir=str(root), seed=seed, test_ratio=0.3, eval_ratio=0))
        exact_only = split_dataset(SplitConfig(data_dir=str(root), seed=seed, test_ratio=0.3, eval_ratio=0,
                                               near_duplicate_distance=-1))
        for manifest, check in ((with_copies, True), (exact_only, False)):
            split = {item.path: item.split for item in manifest.items}
            apart = sum(len({split[f"{label}/{i:02d}.png"], split[f"{label}/{i:02d}-copy.jpg"],
                             split[f"{label}/{i:02d}-small.png"]}) > 1 for label, i in originals)
            if check:
                assert apart == 0, f"seed {seed}: near copies in different splits"
            else:
                separated += apart
    assert separated > 0  # without grouping, copies do land on both sides: the check above can fail
