"""A living gallery: add and remove images of a serving bundle without retraining, as a new bundle version.

A new version is stored as its changes over the gallery's base version (imgsim.changes: the added vectors and
items, the removed ids) while they stay small (imgsim.changes.fits); then, or when asked (``full``), as
a whole gallery with a rebuilt index, which becomes the base of the versions after it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from imgsim import duplicates, hashing
from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BaseRef, Lineage, Probes
from imgsim.changes import Changes, fits
from imgsim.effort import retune
from imgsim.errors import ImgsimError
from imgsim.index import GalleryIndex, GalleryItem
from imgsim.metrics import index_recall
from imgsim.stages import intake
from imgsim.stages.bundle_writer import PROBE_COUNT
from imgsim.stages.settings import AddConfig, RemoveConfig

if TYPE_CHECKING:  # torch only where a model is compared
    from imgsim.nn.model import TrainedModel

ADDED_SPLIT = "added"
# Gallery vectors each version's recall@10 is measured with: enough neighbours for a small standard error.
RECALL_QUERIES = 500


@dataclasses.dataclass
class Change:
    """A new gallery version (not yet saved) and what went into it."""

    bundle: ServingBundle
    added: list[GalleryItem]
    removed: list[GalleryItem]
    skipped: list[tuple[str, str]]  # (path, why): exact copies always, near copies with skip_near_duplicates
    duplicates: duplicates.DuplicateReport  # copies found among the added images and against the gallery
    metrics: dict[str, float]

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "removed": len(self.removed), "skipped": len(self.skipped),
                "gallery_size": len(self.bundle.index.items)}


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_images(parent: ServingBundle, cfg: AddConfig, files: list[str] | None = None, *,
               as_changes: bool = True) -> Change:
    """Embed only the new images, skip copies, and make the next version: the changes over the parent's base, or
    (``as_changes`` False, ``cfg.full``, or changes past imgsim.changes.fits) an index rebuilt from the stored
    vectors. Every file is checked before anything is built: one bad file fails the whole change, naming it."""
    _whole(parent)
    root = intake.image_root(parent, cfg.root)
    found, left_out = intake.list_inputs(files if files is not None else split_list(cfg.paths), cfg.folder, root)
    inputs, sha, errors = intake.read_all(parent, found, cfg.max_pixels)
    if errors:
        shown = "; ".join(f"{path}: {why}" for path, why in errors[:10])
        raise ImgsimError(f"{len(errors)} of {len(found)} file(s) cannot be added ({shown}"
                          f"{'; ...' if len(errors) > 10 else ''}). Nothing was changed: remove or fix them and run again.")
    rel = [str(p.relative_to(root)) for p in found]
    new_rows, skipped, pairs = intake.drop_exact(parent.index, rel, sha)
    skipped += left_out
    embeddings = _embed(parent, inputs[new_rows], cfg.embed_batch_size)
    hashes = hashing.phash_inputs(inputs[new_rows])
    near = intake.near_copies(parent.index, [rel[i] for i in new_rows], hashes, embeddings,
                                cfg.hash_distance, cfg.embedding_distance)
    pairs += near
    keep = np.ones(len(new_rows), dtype=bool)
    if cfg.skip_near_duplicates:
        for copy in near:
            keep[copy.b_index] = False
            skipped.append((rel[new_rows[copy.b_index]], f"near copy of {copy.pair.a} ({intake.distances(copy.pair)})"))
    new_rows = [r for r, k in zip(new_rows, keep) if k]
    embeddings, hashes = embeddings[keep], hashes[keep]
    labels = [cfg.label or _folder_label(path, parent.spec.classes) for path in (rel[i] for i in new_rows)]
    first = parent.index.next_id
    added = [GalleryItem(first + n, rel[i], label, ADDED_SPLIT, sha[i], h)
             for n, (i, label, h) in enumerate(zip(new_rows, labels, hashing.to_hex(hashes)))]
    report = duplicates.DuplicateReport([p.pair for p in pairs], len(found))
    if not added:
        return Change(parent, [], [], skipped, report, {})
    index, changes = _next_index(parent, embeddings, added, set(), seed=cfg.seed, next_id=first + len(added),
                                 full=cfg.full or not as_changes)
    probes = _top_up(parent.probes, index, added, inputs[new_rows], embeddings)
    new = len(parent.index.items) + np.arange(len(added))
    return _finish(parent, index, changes, probes, added, [], skipped, report, cfg.seed, new, root)


def remove_images(parent: ServingBundle, cfg: RemoveConfig, *, as_changes: bool = True) -> Change:
    """Drop items by id or path; the ids of what remains do not change, and a removed id is never reused."""
    _whole(parent)
    rows = _rows_to_remove(parent.index, split_list(cfg.ids), split_list(cfg.paths))
    if len(rows) == len(parent.index.items):
        raise ImgsimError(f"removing all {len(rows)} images would leave an empty gallery; a gallery needs at least "
                          "one image. Nothing was changed.")
    removed = [parent.index.items[r] for r in rows]
    index, changes = _next_index(parent, np.zeros((0, parent.index.dim), dtype=np.float32), [],
                                 {item.id for item in removed}, seed=cfg.seed, next_id=parent.index.next_id,
                                 full=cfg.full or not as_changes)
    # Probes of removed images stay: they still prove the model; the index is checked on the others.
    return _finish(parent, index, changes, parent.probes, [], removed, [], duplicates.DuplicateReport([], 0), cfg.seed,
                   np.zeros(0, dtype=np.int64), parent.lineage.root or "")


def _whole(parent: ServingBundle) -> None:
    if parent.shard is not None:
        raise ImgsimError("this bundle is one part of a sharded gallery: change the whole gallery's bundle, then "
                          "shard the new version again (imgsim shard-bundle)")


def _next_index(parent: ServingBundle, vectors: NDArray[np.float32], added: list[GalleryItem], removed: set[int],
                *, seed: int, next_id: int, full: bool) -> tuple[GalleryIndex, Changes | None]:
    """The parent's changes over its base plus this change's, as one index and those changes; rebuilt as a whole
    (no changes) when asked or when the changes have outgrown a version of changes (imgsim.changes.fits)."""
    prior = parent.changes
    base = prior.base if prior is not None else parent.index
    vectors = np.concatenate([prior.added, vectors]) if prior is not None else vectors
    items = (prior.added_items if prior is not None else []) + added
    kept = [i for i, item in enumerate(items) if item.id not in removed]  # an added image removed again
    from_base = [i for i in removed if base.row(i) is not None]
    changes = Changes(base, vectors[kept], [items[i] for i in kept],
                      np.union1d(prior.removed if prior is not None else [], from_base))
    index = changes.index(next_id)
    if not full and fits(len(changes), len(base.items)):
        return index, changes
    return GalleryIndex.build(np.asarray(index.embeddings), index.items, n_trees=base.n_trees, seed=seed,
                              next_id=next_id, backend=base.backend), None


def _finish(parent: ServingBundle, index: GalleryIndex, changes: Changes | None, probes: Probes,
            added: list[GalleryItem], removed: list[GalleryItem], skipped, report, seed: int,
            new_rows: NDArray[np.int64], root: str | Path) -> Change:
    search_k = parent.search_k
    if changes is None:  # a rebuilt index: its effort measured again, as extract measures it
        search_k, _ = retune(index, np.asarray(index.embeddings), parent.recall_target, parent.search_k, seed,
                             "gallery: the rebuilt index")
    metrics = _recall(index, search_k, seed, new_rows)
    # A version of changes names its base: the parent's own base, or the parent itself when it is whole (where
    # it is stored is the caller's to fill in: imgsim.runs.gallery).
    base = None if changes is None else parent.base or BaseRef("", dict(parent.files), len(parent.index.items))
    bundle = ServingBundle(parent.spec, index, probes, parent.source, search_k,
                           metrics["index_recall_at_10"], onnx_parity=parent.onnx_parity,
                           quantization=parent.quantization, lineage=Lineage(root=str(root)), base=base,
                           recall_target=parent.recall_target, changes=changes)
    return Change(bundle, added, removed, skipped, report, metrics | {"gallery_size": float(len(index.items))})


def _recall(index: GalleryIndex, search_k: int, seed: int, new_rows: NDArray[np.int64]) -> dict[str, float]:
    """Recall@10 against exact search at the bundle's search_k, on gallery vectors as queries: half of them new
    ones when images were added, so both the old and the new part of the index are measured."""
    n = len(index.items)
    rng = np.random.default_rng(seed)
    picked_new = rng.permutation(new_rows)[: RECALL_QUERIES // 2]
    rest = rng.permutation(n)[: RECALL_QUERIES - len(picked_new)]
    vectors = np.asarray(index.embeddings)
    queries = vectors[np.concatenate([picked_new, rest]).astype(np.int64)]
    return index_recall(queries, vectors, index, search_k)


def _embed(parent: ServingBundle, inputs: NDArray[np.uint8], batch_size: int) -> NDArray[np.float32]:
    out = np.zeros((len(inputs), parent.index.dim), dtype=np.float32)
    for start in tqdm(range(0, len(inputs), batch_size), desc="gallery add: embedding", unit="batch",
                      mininterval=1.0, disable=len(inputs) <= batch_size):
        out[start:start + batch_size] = parent.engine(inputs[start:start + batch_size])[0]
    return out


def _folder_label(path: str, classes: list[str]) -> str:
    top = Path(path).parts[0] if len(Path(path).parts) > 1 else ""
    return top if top in classes else ""


def _top_up(probes: Probes, index: GalleryIndex, added: list[GalleryItem], inputs: NDArray[np.uint8],
            embeddings: NDArray[np.float32]) -> Probes:
    """Keep the parent's probes; when removals left fewer than PROBE_COUNT of them in the gallery, add new ones
    from the images just added (their inputs and embeddings are at hand)."""
    present = sum(index.row(int(i)) is not None for i in probes.ids)
    take = min(max(0, PROBE_COUNT - present), len(added))
    if not take:
        return probes
    pick = np.linspace(0, len(added) - 1, take).astype(int)
    return probes + Probes(np.asarray([added[i].id for i in pick], dtype=np.int64), [added[i].sha256 for i in pick],
                           inputs[pick], embeddings[pick])


def _rows_to_remove(index: GalleryIndex, ids: list[str], paths: list[str]) -> list[int]:
    if not ids and not paths:
        raise ImgsimError("name the images to remove: --ids 12,57 or --paths class/a.png,class/b.png")
    rows, unknown = [], []
    for text in ids:
        try:
            row = index.row(int(text))
        except ValueError:
            raise ImgsimError(f"gallery id {text!r} is not a number; ids are the 'id' of search answers") from None
        (unknown if row is None else rows).append(text if row is None else row)
    by_path = {item.path: row for row, item in enumerate(index.items)}
    for path in paths:
        (rows.append(by_path[path]) if path in by_path else unknown.append(path))
    if unknown:
        raise ImgsimError(f"not in this gallery version ({len(index.items)} images): {', '.join(map(str, unknown[:10]))}"
                          f"{', ...' if len(unknown) > 10 else ''}. Nothing was changed; check the ids or paths "
                          "(paths as the gallery stores them, relative to its image root).")
    return sorted(set(rows))


def check_model(parent: "TrainedModel", given: "TrainedModel") -> None:
    """Refuse a change that names another model than the one that built the bundle (compared by weight values)."""
    ours, theirs = parent.fingerprint(), given.fingerprint()
    if theirs != ours:
        raise ImgsimError(f"the model given (fingerprint {theirs[:12]}) is not the model of this gallery "
                          f"({ours[:12]}): a gallery version keeps its model. To index with another model, run "
                          "extract with it (a new gallery); nothing was changed.")
