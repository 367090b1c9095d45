"""A living gallery: add and remove images as new registered bundle versions, copies found, bad input refused."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from imgsim import hashing
from imgsim.bundle import ServingBundle
from imgsim.cli import main as cli
from imgsim.errors import ImgsimError
from imgsim.runs import tracking
from imgsim.runs.export import export_bundle, fetched_version
from imgsim.runs.gallery import run_gallery_remove
from imgsim.serve.search import Searcher
from imgsim.stages import gallery
from imgsim.stages.settings import RemoveConfig
from tests.bundles import other_model_bundle
from tests.conftest import photo
from tests.galleries import add, alias_version, load_version, new_images, remove


def test_add_embeds_only_the_new_images_keeps_ids_and_moves_the_alias(living, monkeypatch):
    v1 = load_version(living["uri"])
    embedded = []
    engine_load = ServingBundle.load

    def counting_load(*args, **kwargs):  # count the images the change embeds through the bundle's own engine
        bundle = engine_load(*args, **kwargs)
        inner = bundle.engine
        bundle.engine = lambda x: (embedded.append(len(x)), inner(x))[1]
        return bundle

    monkeypatch.setattr(ServingBundle, "load", counting_load)
    summary = add(living, paths=",".join(new_images(living["incoming"], 4)))
    monkeypatch.undo()
    assert sum(embedded) == 4  # the four new images only (the probe check at load runs before the counter)
    assert summary["version"] == "2" and summary["added"] == 4 and alias_version(living) == "2"
    v2 = load_version(living["uri"])
    assert v2.version == "2" and len(v2.index.items) == len(v1.index.items) + 4
    assert v2.index.items[: len(v1.index.items)] == v1.index.items  # every old id, path, label and hash kept
    np.testing.assert_array_equal(np.asarray(v2.index.embeddings)[: len(v1.index.items)], np.asarray(v1.index.embeddings))
    new = v2.index.items[len(v1.index.items):]
    assert [item.id for item in new] == list(range(v1.index.next_id, v1.index.next_id + 4))
    assert all(item.split == "added" and item.path.startswith(living["incoming"].name) and item.phash for item in new)
    assert v2.files["weights.pt"] == v1.files["weights.pt"] and v2.files["model.onnx"] == v1.files["model.onnx"]
    lineage = v2.lineage
    assert lineage.parent["version"] == "1" and lineage.change == {"added": 4, "removed": 0, "skipped": 0}
    assert lineage.parent["index_sha256"] == v1.files["index.ann"]
    run = mlflow.get_run(summary["run_id"])
    assert run.data.tags["imgsim.parent_version"] == "1" and run.data.metrics["added_images"] == 4
    assert run.data.metrics["index_recall_at_10"] >= 0.9
    # Each new image finds itself first, under its new id.
    with fetched_version(living["uri"]) as (folder, _):
        searcher = Searcher(folder)
        for item in new:
            top = searcher.search_bytes([(living["root"] / item.path).read_bytes()], 1)[0].neighbours[0]
            assert (top.id, top.path) == (item.id, item.path)


def test_remove_drops_images_for_good_and_never_reuses_their_ids(living):
    v1 = load_version(living["uri"])
    gone = [v1.index.items[3], v1.index.items[-1]]  # the last one holds the largest id
    summary = remove(living, ids=str(gone[0].id), paths=gone[1].path)
    assert summary["removed"] == 2 and summary["version"] == "2"
    v2 = load_version(living["uri"])
    assert {item.id for item in v2.index.items} == {item.id for item in v1.index.items} - {g.id for g in gone}
    assert v2.index.next_id == v1.index.next_id and v2.lineage.change["removed"] == 2
    with fetched_version(living["uri"]) as (folder, _):
        searcher = Searcher(folder)
        for item in gone:  # not even its own bytes bring a removed image back
            answer = searcher.search_bytes([(living["root"] / item.path).read_bytes()], len(v2.index.items))[0]
            assert item.id not in {n.id for n in answer.neighbours}
    add(living, paths=",".join(new_images(living["incoming"], 1)))
    v3 = load_version(living["uri"])
    assert v3.index.items[-1].id == v1.index.next_id  # the removed largest id is not handed out again


def test_copies_are_skipped_or_reported_at_ingest(living):
    v1 = load_version(living["uri"])
    source = living["root"] / v1.index.items[0].path
    exact = living["incoming"] / "exact.png"
    exact.write_bytes(source.read_bytes())
    near = living["incoming"] / "near.jpg"  # the same picture re-encoded: other bytes, same content
    Image.open(source).convert("RGB").save(near, quality=90)
    fresh = living["incoming"] / "noise.png"  # like nothing in the gallery (its synthetic circles are alike)
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 32), dtype=np.uint8)).save(fresh)
    summary = add(living, paths=f"{exact},{near},{fresh},{exact}")
    assert summary["added"] == 2 and len(summary["skipped"]) == 1  # the exact copy once: the same path twice is one file
    assert any("exact copy of gallery image" in line for line in summary["skipped"])
    assert summary["duplicates"]["exact_pairs"] == 1 and summary["duplicates"]["near_pairs"] == 1
    run = MlflowClient().download_artifacts(summary["run_id"], "changes")
    rows = list(csv.DictReader(open(Path(run) / "duplicates.csv")))
    assert {(r["kind"], r["b"]) for r in rows} == {("exact", f"incoming-{living['name']}/exact.png"),
                                                   ("near", f"incoming-{living['name']}/near.jpg")}
    assert (Path(run) / "duplicates.png").stat().st_size > 0
    again = add(living, paths=str(near), skip_near_duplicates=True)  # now in the gallery: its exact copy
    assert again["version"] is None and again["added"] == 0 and alias_version(living) == "2"
    other = living["incoming"] / "near2.png"
    Image.open(source).resize((30, 30)).save(other)  # resized: a near copy of the gallery's original
    skipped = add(living, folder=str(living["incoming"]), skip_near_duplicates=True)
    assert skipped["added"] == 0 and any("near copy of" in line and "near2.png" in line for line in skipped["skipped"])


@pytest.mark.parametrize("case", ["not an image", "outside the root", "unknown id", "another model", "no such path"])
def test_bad_changes_are_refused_and_change_nothing(living, tmp_path, case):
    before = alias_version(living)
    versions = len(MlflowClient().search_model_versions(f"name='{living['name']}'"))
    with pytest.raises(ImgsimError) as err:
        if case == "not an image":
            bad = living["incoming"] / "notes.png"
            bad.write_text("not an image")
            add(living, paths=",".join(new_images(living["incoming"], 2) + [str(bad)]))
        elif case == "outside the root":
            add(living, paths=",".join(new_images(tmp_path, 1)))
        elif case == "unknown id":
            remove(living, ids="0,99999")
        elif case == "no such path":
            remove(living, paths="circle/nope.png")
        else:
            with fetched_version(living["uri"]) as (folder, _):
                other = other_model_bundle(folder, tmp_path / "other")
            add(living, paths=",".join(new_images(living["incoming"], 1)), model_uri=str(other))
    message = str(err.value)
    expected = {"not an image": "notes.png", "outside the root": "outside the image root", "unknown id": "99999",
                "no such path": "circle/nope.png", "another model": "is not the model of this gallery"}[case]
    assert expected in message and "nothing was changed" in message.lower()
    assert alias_version(living) == before
    assert len(MlflowClient().search_model_versions(f"name='{living['name']}'")) == versions


def test_an_alias_moved_meanwhile_is_not_overwritten(living):
    with fetched_version(living["uri"]) as (folder, version):
        parent = ServingBundle.load(folder)
    add(living, paths=",".join(new_images(living["incoming"], 1)))  # someone else: version 2
    with pytest.raises(ImgsimError, match="moved to version 2.*nothing was registered"):
        tracking.register_bundle(living["name"], mlflow.search_runs(output_format="list", max_results=1)[0].info.run_id,
                                 "file:///nowhere", "serving", bundle_sha256="0" * 64, index_sha256="0" * 64,
                                 parent=tracking.Parent(parent.files["index.ann"], version))
    assert alias_version(living) == "2" and parent.index.items
    assert len(MlflowClient().search_model_versions(f"name='{living['name']}'")) == 2
    assert not MlflowClient().search_registered_models(f"name='{living['name']}{tracking.LOCK_SUFFIX}'")


@pytest.mark.parametrize("form", ["pinned", "runs", "folder"])
def test_a_change_from_an_older_gallery_in_any_form_cannot_undo_newer_versions(living, form, tmp_path):
    client = MlflowClient()
    v1 = client.get_model_version(living["name"], "1")
    add(living, paths=",".join(new_images(living["incoming"], 1)))  # version 2: the alias moves on
    uri = {"pinned": f"models:/{living['name']}/1", "runs": f"runs:/{v1.run_id}/bundle",
           "folder": str(export_bundle(f"models:/{living['name']}/1", tmp_path / "v1"))}[form]
    with pytest.raises(ImgsimError, match="moved to version 2 while this change was built from"):
        run_gallery_remove(RemoveConfig(bundle=uri, register_name=living["name"], ids="0"))
    assert alias_version(living) == "2"
    assert len(client.search_model_versions(f"name='{living['name']}'")) == 2  # nothing registered


def test_a_change_from_the_current_gallery_in_any_form_lands(living, tmp_path):
    folder = export_bundle(living["uri"], tmp_path / "current")  # version 1, as a folder
    summary = run_gallery_remove(RemoveConfig(bundle=str(folder), register_name=living["name"], ids="0"))
    assert summary["version"] == "2" and alias_version(living) == "2"
    version = MlflowClient().get_model_version(living["name"], "2")
    assert version.tags[tracking.INDEX_TAG] == load_version(f"models:/{living['name']}/2").files["index.ann"]


def test_two_processes_adding_from_one_parent_one_wins_the_other_is_refused(living, tmp_path):
    # Both start from version 1 and number their new images from its next_id: both landing would give one
    # id two images. Real processes, the real sqlite store. Both name version 1 itself: with the alias, a
    # process that started after the other had landed would (rightly) build on version 2, and the outcome
    # would hang on process start-up times (it did, on a busy machine).
    batches = []
    for n in range(2):
        folder = living["incoming"] / f"batch{n}"
        folder.mkdir()
        batches.append(new_images(folder, 2, start=700 + 10 * n))
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    procs = [subprocess.Popen([sys.executable, "-m", "imgsim.cli", "gallery", "add", *batch, "--bundle",
                               f"models:/{living['name']}/1", "--register-name", living["name"]], env=env, cwd=living["work"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for batch in batches]
    outs = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert sorted(code for _, _, code in outs) == [0, 2], outs
    loser = next(err for _, err, code in outs if code == 2)
    assert "moved to version 2 while this change was built from version 1" in loser and "Run the change again" in loser
    assert alias_version(living) == "2" and len(MlflowClient().search_model_versions(f"name='{living['name']}'")) == 2
    # run again, as the message says: it lands on top of the winner, nothing lost, every id names one image
    lost = batches[[code for _, _, code in outs].index(2)]
    assert cli(["gallery", "add", *lost, "--bundle", living["uri"], "--register-name", living["name"]]) == 0
    items = load_version(living["uri"]).index.items
    added = [i for i in items if i.split == "added"]
    assert len(added) == 4 and len({i.id for i in items}) == len(items)


def test_the_cli_adds_a_folder_and_removes_by_id(living, capsys, tmp_path):
    new_images(living["incoming"], 3)
    # What split leaves out, a folder add leaves out too: hidden folders (a file manager's thumbnails) and
    # files; a symlinked folder is reported, not followed.
    (living["incoming"] / ".thumbnails").mkdir()
    new_images(living["incoming"] / ".thumbnails", 2, start=900)
    new_images(living["incoming"], 1, start=950)
    (living["incoming"] / "new-950.png").rename(living["incoming"] / ".hidden.png")
    (tmp_path / "elsewhere").mkdir()
    new_images(tmp_path / "elsewhere", 1, start=960)
    (living["incoming"] / "linked").symlink_to(tmp_path / "elsewhere")
    assert cli(["gallery", "add", "--bundle", living["uri"], "--register-name", living["name"],
                "--folder", str(living["incoming"]), "--label", "circle"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["added"] == 3
    assert "linked: symlinked folder: not followed" in out.err and ".thumbnails" not in out.err + out.out
    v2 = load_version(living["uri"])
    new = [item for item in v2.index.items if item.split == "added"]
    assert len(new) == 3 and {item.label for item in new} == {"circle"}
    assert cli(["gallery", "remove", "--bundle", living["uri"], "--register-name", living["name"],
                "--ids", str(new[0].id)]) == 0
    assert cli(["gallery", "remove", "--bundle", living["uri"], "--register-name", living["name"],
                "--ids", str(new[0].id)]) == 2
    assert "not in this gallery version" in capsys.readouterr().err


def test_duplicates_in_a_folder_and_in_a_gallery(living, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        photo(i).save(folder / f"{i}.png")
    (folder / "copy.png").write_bytes((folder / "0.png").read_bytes())
    Image.open(folder / "1.png").convert("RGB").save(folder / "1-reencoded.jpg", quality=80)
    Image.open(folder / "2.png").resize((64, 64)).save(folder / "2-small.png")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    assert cli(["duplicates", str(folder), "--out", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exact_pairs"] == 1 and report["near_pairs"] >= 2 and report["unreadable"] == 1
    rows = list(csv.DictReader(open(tmp_path / "out" / "duplicates.csv")))
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], set()).update((row["a"], row["b"]))
    assert {"0.png", "copy.png"} in groups.values() and {"1.png", "1-reencoded.jpg"} in groups.values()
    assert {"2.png", "2-small.png"} in groups.values() and (tmp_path / "out" / "duplicates.png").exists()
    # A gallery: from the hashes and embeddings the bundle stores. The fixture's image folder holds one exact
    # copy (stripes/duplicate.png), which split kept out of test, so it is in the indexed gallery twice at most.
    assert cli(["duplicates", "--bundle", living["uri"], "--out", str(tmp_path / "g")]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["scanned"] == len(load_version(living["uri"]).index.items) and "csv" in counts


def test_pairs_are_found_without_comparing_all_pairs_exactly_as_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, (300, 3)).astype(np.uint64)
    hashes = np.concatenate([base, base ^ flips[:, 0], base ^ flips[:, 0] ^ flips[:, 1], base[:20]])
    all_pairs = hashing.hamming(hashes[:, None], hashes[None, :])
    for d in (0, 2, 4):
        brute = {(i, j, int(all_pairs[i, j])) for i, j in zip(*np.nonzero(all_pairs <= d)) if i < j}
        assert {tuple(map(int, p)) for p in hashing.near_pairs(hashes, d)} == brute


def test_a_re_encoded_or_resized_photo_hashes_within_the_default_distance():
    img = photo(1, 200)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    variants = [Image.open(io.BytesIO(buf.getvalue())), img.resize((100, 100)), img.resize((300, 300))]
    base = hashing.phash_images([img])[0]
    assert all(hashing.hamming(base, h) <= hashing.DEFAULT_HASH_DISTANCE for h in hashing.phash_images(variants))
    others = hashing.phash_images([photo(seed, 200) for seed in range(2, 12)])
    assert (hashing.hamming(base, others) > hashing.DEFAULT_HASH_DISTANCE).all()


def test_a_gallery_version_exports_and_serves_like_an_extract_bundle(living, tmp_path):
    add(living, paths=",".join(new_images(living["incoming"], 2)))
    out = export_bundle(living["uri"], tmp_path / "bundle")
    searcher = Searcher(out)
    assert searcher.size == len(load_version(living["uri"]).index.items)
    assert gallery.ADDED_SPLIT in {item.split for item in searcher.index.items}


def test_the_gallery_s_own_registered_model_is_accepted(living, pipeline_run):
    # Its weights file differs byte for byte from the bundle's (MLflow wrote it), its values do not.
    summary = add(living, paths=",".join(new_images(living["incoming"], 1)), model_uri=pipeline_run["result"]["model_uri"])
    assert summary["version"] == "2"
