"""split: validation with reasons, stratification, reproducibility, duplicates and the too-few rule."""

import collections
import shutil

import pytest

from imgsim.errors import ImgsimError
from imgsim.manifest import Manifest
from imgsim.split import SplitConfig, split_dataset
from tests.conftest import CLASSES


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
    manifest = split_dataset(SplitConfig(data_dir=str(root), test_ratio=0.25, eval_ratio=0.1))
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
