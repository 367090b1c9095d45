"""Gallery versions stored as their changes over a base version: the same answers as a rebuilt index, a version
that holds only what changed, a base that must be exactly the one the changes were made on."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from imgsim import changes as changes_module
from imgsim import index as index_module
from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BASE_DIR, BUNDLE_JSON, CHANGES_VERSION_FILES, BundleError
from imgsim.changes import MAX_CHANGE_FRACTION, Changes, fits
from imgsim.duplicates import find_in_bundle
from imgsim.errors import ImgsimError
from imgsim.explore.gallery import Gallery
from imgsim.index import ANNOY, BACKENDS, FAISS_FLAT, GalleryIndex, GalleryItem, cosines
from imgsim.metrics import exact_topk
from imgsim.modelspec import file_sha256
from imgsim.runs import export, rollout, tracking
from imgsim.runs.export import export_bundle, fetched_version, resolve_bundle
from imgsim.serve.search import Searcher
from imgsim.stages.sharding import shard_bundle
from tests.galleries import add, load_version, new_images, remove
from tests.test_index_backends import clustered, items


def _changed(base: GalleryIndex, vectors: np.ndarray, removed_rows: list[int]) -> tuple[GalleryIndex, GalleryIndex]:
    """(the base with these changes, the same gallery rebuilt as one faiss-flat index)."""
    n = len(base.items)
    added = [GalleryItem(5000 + i, f"new-{i}.png", "", "added", f"{i:064x}") for i in range(len(vectors))]
    changes = Changes(base, vectors, added, np.asarray([base.items[r].id for r in removed_rows], dtype=np.int64))
    index = changes.index(next_id=5000 + len(vectors))
    keep = np.setdiff1d(np.arange(n), removed_rows)
    whole = np.concatenate([np.asarray(base.embeddings)[keep], vectors])
    rebuilt = GalleryIndex.build(whole, [base.items[r] for r in keep] + added, backend=FAISS_FLAT)
    return index, rebuilt


def test_an_exact_base_with_changes_answers_exactly_like_the_rebuilt_gallery():
    base = GalleryIndex.build(clustered(600), items(600), backend=FAISS_FLAT)
    removed = list(range(0, 600, 7))  # 86 removed, among them many a query's nearest
    index, rebuilt = _changed(base, clustered(40, seed=3), removed)
    assert index.items == rebuilt.items and len(index.ann) == len(rebuilt.items) == 600 - 86 + 40
    np.testing.assert_array_equal(np.asarray(index.embeddings), np.asarray(rebuilt.embeddings))
    for q in np.concatenate([clustered(30, seed=4), clustered(40, seed=3)[:10]]):  # new images as queries too
        for k in (1, 10, len(rebuilt.items)):
            rows, dists = index.search(q, k)
            want_rows, want_dists = rebuilt.search(q, k)
            assert [index.items[r].id for r in rows] == [rebuilt.items[r].id for r in want_rows]
            # (compared as cosines: float32 noise of 1e-7 in a cosine near 1 is 3e-4 in sqrt(2 - 2 cos))
            np.testing.assert_allclose(1 - np.square(dists) / 2, 1 - np.square(want_dists) / 2, atol=1e-6)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 10 ** 6)), min_size=1, max_size=12))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_sequence_of_changes_keeps_rows_vectors_and_ids_in_step(steps):
    """Adds and removes in any order (removing base items and items added earlier): the rows of items,
    embeddings and indexed vectors stay the same images, and the nearest item of a stored vector is itself."""
    base = GalleryIndex.build(clustered(120, seed=5), items(120), backend=FAISS_FLAT)
    vectors, added, removed, next_id = np.zeros((0, base.dim), np.float32), [], set(), 5000
    for is_add, seed in steps:
        if is_add:
            vectors = np.concatenate([vectors, clustered(3, seed=seed)])
            added += [GalleryItem(next_id + i, f"n{next_id + i}.png", "", "added", "") for i in range(3)]
            next_id += 3
        else:
            alive = [it.id for it in base.items if it.id not in removed] + [it.id for it in added]
            gone = alive[seed % len(alive)]
            keep = [i for i, it in enumerate(added) if it.id != gone]
            vectors, added = vectors[keep], [added[i] for i in keep]
            removed |= {gone} if base.row(gone) is not None else set()
    index = Changes(base, vectors, added, np.asarray(sorted(removed), dtype=np.int64)).index(next_id)
    assert len(index.items) == len(index.ann) == len(index.embeddings) == 120 - len(removed) + len(added)
    assert not {it.id for it in index.items} & removed
    stored = np.asarray(index.embeddings)
    rows = np.arange(len(index.items))
    np.testing.assert_array_equal(index.ann.vectors(rows), stored)
    np.testing.assert_array_equal(index.embeddings[rows[::-1]], stored[::-1])
    for r in range(0, len(rows), 7):  # (a row or a copy of it: a seed may repeat)
        np.testing.assert_array_equal(stored[index.search(stored[r], 1)[0][0]], stored[r])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != FAISS_FLAT])
def test_approximate_bases_keep_their_recall_with_changes(backend):
    base = GalleryIndex.build(clustered(3000), items(3000), n_trees=10, backend=backend)
    index, rebuilt = _changed(base, clustered(300, seed=6), list(range(0, 3000, 11)))
    queries = clustered(200, seed=7)
    truth = exact_topk(queries, np.asarray(rebuilt.embeddings), 10)
    found = [index.search(q, 10, 1500)[0] for q in queries]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.95, f"{backend}: recall@10 {recall:.3f} with changes"


@pytest.mark.parametrize("backend", BACKENDS)
def test_removing_a_query_s_whole_neighbourhood_still_answers_k_nearest_remaining(backend):
    """A fifth of the base removed, all of it around the queries (a whole class gone): the answers are the
    exact k nearest of what remains, however deep the base's index has to be asked (or, past that, exactly)."""
    base = GalleryIndex.build(clustered(20_000, seed=8), items(20_000), n_trees=20, backend=backend)
    vectors = np.asarray(base.embeddings)
    centre = vectors[0]
    removed = np.argsort(-(vectors @ centre))[:4000]  # the 4,000 items nearest the queries
    index, rebuilt = _changed(base, np.zeros((0, base.dim), np.float32), sorted(removed.tolist()))
    queries = vectors[removed[:10]] + 0.01 * np.random.default_rng(9).normal(size=(10, base.dim)).astype(np.float32)
    remaining = np.asarray(rebuilt.embeddings)
    for q, truth in zip(queries, exact_topk(queries, remaining, 10)):
        rows, _ = index.search(q, 10, 1500)
        assert len(rows) == 10 and len(set(rows) & set(truth)) >= 9, (backend, rows, truth)


def _scanned(monkeypatch) -> list[int]:
    """The rows of each exact ranking of base rows from now on (imgsim.index's cosines: ChangedIndex's own scan
    of the added vectors calls changes' name for it)."""
    sizes: list[int] = []
    monkeypatch.setattr(index_module, "cosines", lambda v, q: sizes.append(len(v)) or cosines(v, q))
    return sizes


def test_k1_next_to_two_removed_items_asks_the_index_instead_of_scanning_the_base(monkeypatch):
    """Two removed items are no crowd: a query for its single nearest item whose two nearest base items are gone
    is answered by the base's index, not by a scan of every remaining base item (as when 2 of an answer of 2 made
    the neighbourhood 'crowded')."""
    base = GalleryIndex.build(clustered(600), items(600), backend=FAISS_FLAT)
    query = np.asarray(base.embeddings)[10]
    index, rebuilt = _changed(base, np.zeros((0, base.dim), np.float32), sorted(base.search(query, 2)[0]))
    scanned = _scanned(monkeypatch)
    rows, _ = index.search(query, 1)
    assert not scanned
    assert [index.items[r].id for r in rows] == [rebuilt.items[r].id for r in rebuilt.search(query, 1)[0]]
    monkeypatch.setattr(changes_module, "CROWDED_SAMPLE", 1)  # judged on the first two alone, it is a crowd
    assert index.search(query, 1)[0] == rows and sum(scanned) == len(index.items)


@pytest.mark.parametrize("k", [1, 10, 30])
def test_a_crowded_neighbourhood_is_ranked_exactly_a_block_at_a_time(monkeypatch, k):
    """The 40 items nearest a query removed: the remaining base is scanned exactly, never more than EXACT_BLOCK
    rows at once and each row once, and answers as the rebuilt gallery does."""
    base = GalleryIndex.build(clustered(600), items(600), backend=FAISS_FLAT)
    query = np.asarray(base.embeddings)[10]
    index, rebuilt = _changed(base, clustered(5, seed=2), sorted(base.search(query, 40)[0]))
    monkeypatch.setattr(index_module, "EXACT_BLOCK", 50)
    scanned = _scanned(monkeypatch)
    rows, dists = index.search(query, k)
    want_rows, want_dists = rebuilt.search(query, k)
    assert [index.items[r].id for r in rows] == [rebuilt.items[r].id for r in want_rows]
    np.testing.assert_allclose(1 - np.square(dists) / 2, 1 - np.square(want_dists) / 2, atol=1e-6)
    assert max(scanned) <= 50 and sum(scanned) == 600 - 40


def test_changes_made_on_another_base_are_refused():
    base = GalleryIndex.build(clustered(50), items(50), backend=ANNOY)
    with pytest.raises(ImgsimError, match="remove ids \\[7\\] that the base gallery does not hold"):
        Changes(base, np.zeros((0, base.dim), np.float32), [], np.asarray([7])).index(5000)
    clash = [GalleryItem(1003, "x.png", "", "added", "")]
    with pytest.raises(ImgsimError, match="add ids \\[1003\\] that the base gallery already holds"):
        Changes(base, clustered(1), clash, np.zeros(0, np.int64)).index(5000)


def _dir_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_a_small_change_stores_only_what_changed_and_serves(living, tmp_path):
    v1 = load_version(living["uri"])
    summary = add(living, paths=",".join(new_images(living["incoming"], 3)))
    assert summary["stored"] == "changes"
    with fetched_version(f"models:/{living['name']}/1") as (folder, _):
        whole_bytes = _dir_bytes(folder)
    client = MlflowClient()
    stored = client.get_model_version_download_uri(living["name"], summary["version"])
    with tracking.fetched(stored, "bundle") as folder:  # the artifact as stored, before imgsim adds the base
        assert sorted(p.name for p in folder.iterdir()) == sorted([*CHANGES_VERSION_FILES, BUNDLE_JSON])
        meta = json.loads((folder / BUNDLE_JSON).read_text())
        assert _dir_bytes(folder) == summary["stored_bytes"] < whole_bytes / 2  # (mostly the probe images here)
    assert meta["base"]["uri"] == f"models:/{living['name']}/1" and meta["changes"] == {"added": 3, "removed": 0}
    assert meta["base"]["files"] == v1.files  # the base named by every file's checksum
    # Removing a base image and one just added: still changes over version 1, the added one simply gone.
    v2 = load_version(living["uri"])
    gone = [v2.index.items[0], v2.index.items[-1]]
    summary = remove(living, ids=f"{gone[0].id},{gone[1].id}")
    v3 = load_version(living["uri"])
    assert summary["stored"] == "changes" and v3.base.uri == f"models:/{living['name']}/1"
    assert len(v3.changes.added_items) == 2 and v3.changes.removed.tolist() == [gone[0].id]
    assert [it.id for it in v3.index.items] == [it.id for it in v2.index.items if it not in gone]
    assert v3.gallery_sha256 not in (v1.gallery_sha256, v2.gallery_sha256)
    # Served through its URI (the base fetched with it), and as one exported folder that needs no MLflow.
    out = export_bundle(living["uri"], tmp_path / "exported")
    assert (out / BASE_DIR / BUNDLE_JSON).is_file()
    searcher = Searcher(out)
    for item in v3.index.items[-2:]:
        top = searcher.search_bytes([(living["root"] / item.path).read_bytes()], 1)[0].neighbours[0]
        assert top.id == item.id
    assert gone[0].id not in {n.id for n in searcher.search_bytes(
        [(living["root"] / gone[0].path).read_bytes()], len(v3.index.items))[0].neighbours}
    with pytest.raises(ImgsimError, match="stored as its changes over the gallery version"):
        rollout.storage(living["uri"])
    assert find_in_bundle(out)[0].scanned == len(v3.index.items)  # the model-free readers put them together too
    assert Gallery.open(out).index.items == v3.index.items
    sharded = shard_bundle(out, tmp_path / "sharded", 2)  # whole parts, from base + changes
    assert sharded["items"] == len(v3.index.items) and not ServingBundle.load(tmp_path / "sharded" / "shard-1").base
    # --full writes the whole gallery again, and the next change is made over it.
    summary = add(living, paths=",".join(new_images(living["incoming"], 1, start=900)), full=True)
    assert summary["stored"] == "whole" and not load_version(living["uri"]).base
    add(living, paths=",".join(new_images(living["incoming"], 1, start=950)))
    assert load_version(living["uri"]).base.uri == f"models:/{living['name']}/{summary['version']}"


def _resolve(tmp_path, uri: str, name: str, have=None):
    """The bundle folder ``uri`` resolves to, fetched into a new ``tmp_path / name`` as the server fetches it."""
    (tmp_path / name).mkdir()
    return resolve_bundle(uri, tmp_path / name, have)[0]


def test_a_refresh_links_the_base_it_already_has_instead_of_downloading_it(living, tmp_path):
    """What the server's live swap does: a version of changes over the very version it serves (v1, whole), or
    over the base it serves with (v2's), takes its base from those files (hard links: the same inodes); any other
    folder is no such base, and the base is downloaded afresh. Each loads (every file checked)."""
    def inodes(folder):
        return {f.relative_to(folder): f.stat().st_ino for f in folder.rglob("*") if f.is_file()}

    v1 = _resolve(tmp_path, f"models:/{living['name']}/1", "v1")
    add(living, paths=",".join(new_images(living["incoming"], 2)))
    v2 = _resolve(tmp_path, living["uri"], "v2", have=v1)
    assert inodes(v2 / BASE_DIR) == inodes(v1)
    served = ServingBundle.load(v2)
    assert served.model_folder == v2 / BASE_DIR and len(served.changes.added_items) == 2
    remove(living, ids=str(served.index.items[0].id))
    v3 = _resolve(tmp_path, living["uri"], "v3", have=served.model_folder)
    assert inodes(v3 / BASE_DIR) == inodes(v1) and ServingBundle.load(v3).changes.removed.size == 1
    not_the_base = shutil.copytree(v1, tmp_path / "not-the-base")  # whole, but its files are not the base's
    meta = json.loads((not_the_base / BUNDLE_JSON).read_text())
    meta["files"]["items.csv"] = "0" * 64
    (not_the_base / BUNDLE_JSON).write_text(json.dumps(meta))
    for other in (v3, not_the_base, tmp_path / "nothing-here"):  # changes; another version; no bundle at all
        fetched = _resolve(tmp_path, living["uri"], f"fetched-{other.name}", have=other)
        assert not set(inodes(fetched / BASE_DIR).values()) & set(inodes(v1).values())
        assert ServingBundle.load(fetched).gallery_sha256 == ServingBundle.load(v3).gallery_sha256


def test_a_base_that_cannot_be_linked_is_copied_or_else_downloaded(living, tmp_path, monkeypatch, caplog):
    """Across file systems (link: EXDEV) the base's files are copied; where copying fails too, it is downloaded
    and nothing half-made is left behind. Either way the version loads."""
    def fail(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    v1 = _resolve(tmp_path, f"models:/{living['name']}/1", "v1")
    add(living, paths=",".join(new_images(living["incoming"], 2)))
    originals = {f.stat().st_ino for f in v1.rglob("*") if f.is_file()}
    caplog.set_level(logging.INFO, logger=export.__name__)
    monkeypatch.setattr(os, "link", fail)
    copied = _resolve(tmp_path, living["uri"], "copied", have=v1)
    assert "not downloaded" in caplog.text and "downloading it" not in caplog.text
    monkeypatch.setattr(export, "_link_or_copy", fail)  # (not shutil.copy2: MLflow's download copies with it)
    downloaded = _resolve(tmp_path, living["uri"], "downloaded", have=v1)
    assert "could not link the base version" in caplog.text and "; downloading it" in caplog.text
    for folder in (copied, downloaded):
        files = [f for f in (folder / BASE_DIR).rglob("*") if f.is_file()]
        assert files and not {f.stat().st_ino for f in files} & originals
        assert len(ServingBundle.load(folder).changes.added_items) == 2
    assert sorted(p.name for p in downloaded.iterdir()) == sorted(p.name for p in copied.iterdir())  # no base.link


def test_changes_past_the_limit_write_the_whole_gallery(living):
    v1 = load_version(living["uri"])
    many = int(MAX_CHANGE_FRACTION * len(v1.index.items)) + 1
    assert not fits(many, len(v1.index.items)) and fits(many - 1, len(v1.index.items))
    summary = remove(living, ids=",".join(str(it.id) for it in v1.index.items[:many]))
    assert summary["stored"] == "whole" and len(load_version(living["uri"]).index.items) == len(v1.index.items) - many


def test_a_version_of_changes_without_its_exact_base_is_refused_by_name(living, tmp_path):
    add(living, paths=",".join(new_images(living["incoming"], 2)))
    out = export_bundle(living["uri"], tmp_path / "v2")
    alone = tmp_path / "alone"
    shutil.copytree(out, alone, ignore=shutil.ignore_patterns(BASE_DIR))
    with pytest.raises(BundleError, match="holds the changes of a gallery version over its base version models:/"):
        ServingBundle.load(alone)
    shutil.copyfile(out / BASE_DIR / "embeddings.npy", out / BASE_DIR / "items.csv")  # a damaged base
    with pytest.raises(BundleError, match="base is damaged: items.csv does not match its recorded sha256"):
        ServingBundle.load(out)
    other = tmp_path / "other"  # a whole, healthy gallery, but not the version the changes were made on
    shutil.copytree(out / BASE_DIR, other)
    meta = json.loads((other / BUNDLE_JSON).read_text())
    shutil.copyfile(alone / "added.csv", other / "items.csv")
    meta["files"]["items.csv"] = file_sha256(other / "items.csv")
    (other / BUNDLE_JSON).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="is not the gallery version the changes in .* were made on"):
        ServingBundle.load(alone, base=other)
