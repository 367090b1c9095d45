"""A living gallery: add and remove images of a serving bundle without retraining, as a new bundle version."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from imgsim import dedup
from imgsim.bundle import PROBE_COUNT, Probes, ServingBundle
from imgsim.config import setting
from imgsim.errors import BadInput, ImgsimError
from imgsim.images import DEFAULT_MAX_PIXELS
from imgsim.index import GalleryItem, IndexBundle
from imgsim.metrics import index_recall
from imgsim.split import walk_files

if TYPE_CHECKING:  # torch only where a model is compared
    from imgsim.model import ModelBundle

ADDED_SPLIT = "added"
GALLERY_NAME, GALLERY_ALIAS = "imgsim-gallery", "serving"
# Gallery vectors each version's recall@10 is measured with (half of them new, when added): 5,000 neighbours,
# a standard error of ~0.001 at recall 0.995, in ~0.5 s on 52k items (exact search is what costs).
RECALL_QUERIES = 500


@dataclasses.dataclass(frozen=True)
class AddConfig:
    """Parameters of ``gallery add``."""

    bundle: str = setting(f"models:/{GALLERY_NAME}@{GALLERY_ALIAS}", "the gallery version to add to: folder, "
                          "runs:/ or models:/", "gallery")
    paths: str = setting("", "image files, comma-separated (the CLI also takes them as arguments)", "data")
    folder: str = setting("", "or every image below this folder", "data")
    label: str = setting("", "label of every added image; default: its class folder under root, if that is a "
                         "model class", "data")
    root: str = setting("", "images must lie inside it; paths are stored relative to it; default: the bundle's "
                        "image root", "data")
    model_uri: str = setting("", "refuse unless this is the bundle's model (same weights)", "model")
    hash_distance: int = setting(dedup.DEFAULT_HASH_DISTANCE, "most differing bits of 64 for a near copy "
                                 "(perceptual hash); -1: exact copies only", "gallery")
    embedding_distance: float = setting(dedup.DEFAULT_EMBEDDING_DISTANCE, "largest cosine distance for a near "
                                        "copy", "gallery")
    skip_near_duplicates: bool = setting(False, "skip near copies too (exact copies are always skipped)",
                                         "gallery")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "refuse images with more pixels (decompression bombs)", "data")
    embed_batch_size: int = setting(256, "images per forward pass while embedding (memory, not results)",
                                    "compute")
    register_name: str = setting(GALLERY_NAME, "register each new version under this name; empty: do not",
                                 "tracking")
    alias: str = setting(GALLERY_ALIAS, "move this alias to the new version; empty: leave it alone", "tracking")
    seed: int = setting(42, "random seed (recall sample)", "data")


@dataclasses.dataclass(frozen=True)
class RemoveConfig:
    """Parameters of ``gallery remove``."""

    bundle: str = setting(f"models:/{GALLERY_NAME}@{GALLERY_ALIAS}", "the gallery version to remove from: "
                          "folder, runs:/ or models:/", "gallery")
    ids: str = setting("", "gallery ids to remove, comma-separated", "data")
    paths: str = setting("", "or gallery paths (as stored: relative to the image root), comma-separated", "data")
    register_name: str = setting(GALLERY_NAME, "register each new version under this name; empty: do not",
                                 "tracking")
    alias: str = setting(GALLERY_ALIAS, "move this alias to the new version; empty: leave it alone", "tracking")
    seed: int = setting(42, "random seed (recall sample)", "data")


@dataclasses.dataclass
class Change:
    """A new gallery version (not yet saved) and what went into it."""

    bundle: ServingBundle
    added: list[GalleryItem]
    removed: list[GalleryItem]
    skipped: list[tuple[str, str]]  # (path, why): exact copies always, near copies with skip_near_duplicates
    duplicates: dedup.DuplicateReport  # copies found among the added images and against the gallery
    metrics: dict[str, float]

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "removed": len(self.removed), "skipped": len(self.skipped),
                "gallery_size": len(self.bundle.index.items)}


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_images(parent: ServingBundle, cfg: AddConfig, files: list[str] | None = None) -> Change:
    """Embed only the new images, skip copies, and build the next version's index from the stored vectors.
    Every file is checked before anything is built: one bad file fails the whole change, naming it."""
    root = _root(parent, cfg.root)
    found, left_out = _list_inputs(files if files is not None else split_list(cfg.paths), cfg.folder, root)
    inputs, sha, errors = _read_all(parent, found, cfg.max_pixels)
    if errors:
        shown = "; ".join(f"{path}: {why}" for path, why in errors[:10])
        raise ImgsimError(f"{len(errors)} of {len(found)} file(s) cannot be added ({shown}"
                          f"{'; ...' if len(errors) > 10 else ''}). Nothing was changed: remove or fix them and run again.")
    rel = [str(p.relative_to(root)) for p in found]
    new_rows, skipped, pairs = _drop_exact(parent.index, rel, sha)
    skipped += left_out
    embeddings = _embed(parent, inputs[new_rows], cfg.embed_batch_size)
    hashes = dedup.phash_inputs(inputs[new_rows])
    near = _near_copies(parent.index, [rel[i] for i in new_rows], hashes, embeddings, cfg)
    pairs += near
    keep = np.ones(len(new_rows), dtype=bool)
    if cfg.skip_near_duplicates:
        for copy in near:
            keep[copy.b_index] = False
            skipped.append((rel[new_rows[copy.b_index]], f"near copy of {copy.pair.a} ({_distances(copy.pair)})"))
    new_rows = [r for r, k in zip(new_rows, keep) if k]
    embeddings, hashes = embeddings[keep], hashes[keep]
    labels = [cfg.label or _folder_label(path, parent.spec.classes) for path in (rel[i] for i in new_rows)]
    first = parent.index.next_id
    added = [GalleryItem(first + n, rel[i], label, ADDED_SPLIT, sha[i], h)
             for n, (i, label, h) in enumerate(zip(new_rows, labels, dedup.to_hex(hashes)))]
    report = dedup.DuplicateReport([p.pair for p in pairs], len(found))
    if not added:
        return Change(parent, [], [], skipped, report, {})
    vectors = np.concatenate([np.asarray(parent.index.embeddings), embeddings])
    index = IndexBundle.build(vectors, parent.index.items + added, n_trees=parent.index.n_trees, seed=cfg.seed,
                              next_id=first + len(added))
    probes = _top_up(parent.probes, index, added, inputs[new_rows], embeddings)
    new = len(parent.index.items) + np.arange(len(added))
    return _finish(parent, index, probes, added, [], skipped, report, cfg.seed, new, root)


def remove_images(parent: ServingBundle, cfg: RemoveConfig) -> Change:
    """Drop items by id or path; the ids of what remains do not change, and a removed id is never reused."""
    rows = _rows_to_remove(parent.index, split_list(cfg.ids), split_list(cfg.paths))
    if len(rows) == len(parent.index.items):
        raise ImgsimError(f"removing all {len(rows)} images would leave an empty gallery; a gallery needs at least "
                          "one image. Nothing was changed.")
    keep = np.ones(len(parent.index.items), dtype=bool)
    keep[rows] = False
    removed = [parent.index.items[r] for r in rows]
    index = IndexBundle.build(np.asarray(parent.index.embeddings)[keep],
                              [item for item, k in zip(parent.index.items, keep) if k],
                              n_trees=parent.index.n_trees, seed=cfg.seed, next_id=parent.index.next_id)
    # Probes of removed images stay: they still prove the model; the index is checked on the others.
    return _finish(parent, index, parent.probes, [], removed, [], dedup.DuplicateReport([], 0), cfg.seed,
                   np.zeros(0, dtype=np.int64), parent.gallery.get("root", ""))


def _finish(parent: ServingBundle, index: IndexBundle, probes: Probes, added: list[GalleryItem],
            removed: list[GalleryItem], skipped, report, seed: int, new_rows: NDArray[np.int64],
            root: str | Path) -> Change:
    metrics = _recall(index, parent.search_k, seed, new_rows)
    bundle = ServingBundle(parent.spec, index, probes, dict(parent.source), parent.search_k,
                           metrics["index_recall_at_10"], onnx_parity=parent.onnx_parity, gallery={"root": str(root)})
    return Change(bundle, added, removed, skipped, report, metrics | {"gallery_size": float(len(index.items))})


def _recall(index: IndexBundle, search_k: int, seed: int, new_rows: NDArray[np.int64]) -> dict[str, float]:
    """Recall@10 against exact search at the bundle's search_k, on gallery vectors as queries: half of them new
    ones when images were added, so both the old and the new part of the index are measured."""
    n = len(index.items)
    rng = np.random.default_rng(seed)
    picked_new = rng.permutation(new_rows)[: RECALL_QUERIES // 2]
    rest = rng.permutation(n)[: RECALL_QUERIES - len(picked_new)]
    vectors = np.asarray(index.embeddings)
    queries = vectors[np.concatenate([picked_new, rest]).astype(np.int64)]
    return index_recall(queries, vectors, index, search_k)


def _root(parent: ServingBundle, root: str) -> Path:
    chosen = root or parent.gallery.get("root", "")
    if not chosen:
        raise ImgsimError("this bundle does not record its image root (it predates living galleries): pass --root "
                          "DIR, the folder its gallery paths are relative to; added images must lie inside it")
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise ImgsimError(f"image root {chosen} is not a folder here; pass --root with the folder the gallery's "
                          "images live in (added images must lie inside it)")
    return path


def _list_inputs(paths: list[str], folder: str, root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files to add, resolved; every one inside ``root`` (symlinks resolved), regular, and named once.
    A folder is walked by split's rules (hidden files and folders such as ``.thumbnails/`` are not images of
    the collection); what those rules leave out with a reason comes back as (path, why)."""
    if bool(paths) == bool(folder):
        raise ImgsimError("give the images to add: either file paths or --folder DIR (not both)")
    left_out: list[tuple[str, str]] = []
    if folder:
        top = Path(folder).expanduser().resolve()
        if not top.is_dir():
            raise ImgsimError(f"--folder {folder} is not a folder")
        if top != root and root not in top.parents:
            raise ImgsimError(f"--folder {folder} lies outside the image root {root}. Copy it under the root (or "
                              "pass --root) first; nothing was changed.")
        found, rejected = walk_files(root, top, "")
        candidates = [root / rel for rel, _ in found]
        left_out = [(r.path, r.reason) for r in rejected]
        if not candidates:
            raise ImgsimError(f"--folder {folder} holds no files to add")
    else:
        candidates = [Path(p).expanduser() for p in paths]
    outside = [str(p) for p in candidates if root not in p.resolve().parents]
    if outside:
        raise ImgsimError(f"{len(outside)} file(s) lie outside the image root {root}: {', '.join(outside[:5])}"
                          f"{', ...' if len(outside) > 5 else ''}. Copy them under the root (or pass --root) first; "
                          "nothing was changed.")
    resolved = [p.resolve() for p in candidates]
    missing = [str(p) for p, r in zip(candidates, resolved) if not r.is_file()]
    if missing:
        raise ImgsimError(f"not a file: {', '.join(missing[:5])}; nothing was changed")
    return list(dict.fromkeys(resolved)), left_out


def _read_all(parent: ServingBundle, files: list[Path], max_pixels: int):
    """Model inputs and sha256 of every file, and (path, reason) for those that are not usable images."""
    preprocess = parent.spec.preprocess
    inputs = np.zeros((len(files), preprocess.channels, preprocess.size, preprocess.size), dtype=np.uint8)
    sha, errors = [], []
    for i, path in enumerate(tqdm(files, desc="gallery add: reading", unit="img", mininterval=1.0)):
        try:
            data = path.read_bytes()
            inputs[i] = preprocess.decode(data, max_pixels=max_pixels)
        except BadInput as exc:
            errors.append((str(path), str(exc)))
            data = b""
        except OSError as exc:
            errors.append((str(path), f"unreadable: {exc.strerror or exc}"))
            data = b""
        sha.append(hashlib.sha256(data).hexdigest())
    return inputs, sha, errors


@dataclasses.dataclass(frozen=True)
class _Found:
    pair: dedup.Pair
    b_index: int  # the new image's position among those embedded


def _drop_exact(index: IndexBundle, rel: list[str], sha: list[str]) -> tuple[list[int], list, list]:
    """Rows of the files to embed: not byte-identical to a gallery image or to an earlier file of this change."""
    in_gallery = {item.sha256: item for item in index.items}
    seen: dict[str, int] = {}
    keep, skipped, pairs = [], [], []
    for i, (path, digest) in enumerate(zip(rel, sha)):
        if digest in in_gallery:
            item = in_gallery[digest]
            skipped.append((path, f"exact copy of gallery image {item.id} ({item.path})"))
            pairs.append(_Found(dedup.Pair(item.path, path, "exact", 0, None, item.id, None), -1))
        elif digest in seen:
            skipped.append((path, f"exact copy of {rel[seen[digest]]}, added in this change"))
            pairs.append(_Found(dedup.Pair(rel[seen[digest]], path, "exact", 0, None), -1))
        else:
            seen[digest] = i
            keep.append(i)
    return keep, skipped, pairs


def _embed(parent: ServingBundle, inputs: NDArray[np.uint8], batch_size: int) -> NDArray[np.float32]:
    out = np.zeros((len(inputs), parent.index.dim), dtype=np.float32)
    for start in tqdm(range(0, len(inputs), batch_size), desc="gallery add: embedding", unit="batch",
                      mininterval=1.0, disable=len(inputs) <= batch_size):
        out[start:start + batch_size] = parent.engine(inputs[start:start + batch_size])[0]
    return out


def _near_copies(index: IndexBundle, rel: list[str], hashes: NDArray[np.uint64], embeddings: NDArray[np.float32],
                 cfg: AddConfig) -> list[_Found]:
    """Each new image's closest near copy, in the gallery or earlier in this change (hash within
    ``hash_distance`` bits and embeddings within ``embedding_distance``)."""
    best: dict[int, tuple[int, float, _Found]] = {}
    if cfg.hash_distance < 0:
        return []
    known = np.asarray([bool(item.phash) for item in index.items])  # older bundles have no hashes
    gallery_hashes = np.zeros(len(index.items), dtype=np.uint64)
    gallery_hashes[known] = dedup.from_hex([item.phash for item in index.items if item.phash])
    vectors = np.asarray(index.embeddings)
    # Embedding first (one matrix product per block of new images), hash on those candidates only: comparing
    # every hash pair would cost new x gallery popcounts.
    for start in range(0, len(embeddings), 256):
        cosine = 1.0 - embeddings[start:start + 256] @ vectors.T
        i, j = np.nonzero((cosine <= cfg.embedding_distance) & known[None, :])
        bits = dedup.hamming(hashes[start + i], gallery_hashes[j])
        close = bits <= cfg.hash_distance
        for a, b, d, cos in zip(start + i[close], j[close], bits[close], cosine[i[close], j[close]]):
            if a not in best or (d, cos) < best[a][:2]:
                item = index.items[b]
                best[a] = (int(d), float(cos), _Found(dedup.Pair(item.path, rel[a], "near", int(d), float(cos),
                                                                 item.id, None), int(a)))
    for a, b, d in dedup.near_pairs(hashes, cfg.hash_distance):  # a < b: the later file is the copy
        cos = float(1.0 - np.dot(embeddings[a], embeddings[b]))
        if cos <= cfg.embedding_distance and (b not in best or (d, cos) < best[b][:2]):
            best[b] = (int(d), cos, _Found(dedup.Pair(rel[a], rel[b], "near", int(d), cos), int(b)))
    return [found for _, _, found in (best[i] for i in sorted(best))]


def _distances(pair: dedup.Pair) -> str:
    return f"hash distance {pair.hash_distance}, cosine distance {pair.cosine_distance:.4f}"


def _folder_label(path: str, classes: list[str]) -> str:
    top = Path(path).parts[0] if len(Path(path).parts) > 1 else ""
    return top if top in classes else ""


def _top_up(probes: Probes, index: IndexBundle, added: list[GalleryItem], inputs: NDArray[np.uint8],
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


def _rows_to_remove(index: IndexBundle, ids: list[str], paths: list[str]) -> list[int]:
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


def check_model(parent: "ModelBundle", given: "ModelBundle") -> None:
    """Refuse a change that names another model than the one that built the bundle (compared by weight values)."""
    ours, theirs = parent.fingerprint(), given.fingerprint()
    if theirs != ours:
        raise ImgsimError(f"the model given (fingerprint {theirs[:12]}) is not the model of this gallery "
                          f"({ours[:12]}): a gallery version keeps its model. To index with another model, run "
                          "extract with it (a new gallery); nothing was changed.")
