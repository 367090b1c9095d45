"""The serving bundle: model + index + metadata with checksums, written together and verified on load."""

from __future__ import annotations

import json
from pathlib import Path

from imgsim import atomic
from imgsim.errors import ImgsimError
from imgsim.index import EMBEDDINGS_FILE, INDEX_FILE, ITEMS_FILE, IndexBundle
from imgsim.model import MODEL_JSON, WEIGHTS, ModelBundle, file_sha256

BUNDLE_JSON = "bundle.json"
FORMAT_VERSION = 1
FILES = (MODEL_JSON, WEIGHTS, INDEX_FILE, ITEMS_FILE, EMBEDDINGS_FILE)


def write_bundle(out_dir: str | Path, model: ModelBundle, index: IndexBundle, model_ref: dict) -> Path:
    """Write the whole bundle into ``out_dir`` atomically; ``model_ref`` names the model it was built from."""
    out = Path(out_dir)
    with atomic.atomic_dir(out) as tmp:
        model.save(tmp)
        index.save(tmp)
        files = {name: file_sha256(tmp / name) for name in FILES}
        meta = {
            "format_version": FORMAT_VERSION,
            "model": {**model_ref, "weights_sha256": files[WEIGHTS], "embedding_dim": model.args.dim,
                      "classes": model.classes},
            "index": {"dim": index.dim, "metric": index.metric, "n_trees": index.n_trees,
                      "count": len(index.items)},
            "files": files,
        }
        (tmp / BUNDLE_JSON).write_text(json.dumps(meta, indent=2))
    return out


def read_bundle_meta(folder: str | Path) -> dict:
    """The bundle's metadata, or a clear error if the folder is not a bundle."""
    path = Path(folder) / BUNDLE_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ImgsimError(f"{folder} is not an imgsim bundle (cannot read {BUNDLE_JSON}: {exc}); "
                          "create one with 'imgsim export --run <extract run id> --out DIR'") from None


def verify_bundle(folder: str | Path) -> dict:
    """Check checksums, model identity, dimension and counts; raise ``ImgsimError`` naming any mismatch."""
    folder = Path(folder)
    meta = read_bundle_meta(folder)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ImgsimError(f"bundle format {meta.get('format_version')} in {folder} is not {FORMAT_VERSION}; re-export it")
    problems = []
    for name in FILES:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(path) != meta["files"].get(name):
            problems.append(f"{name} does not match its recorded sha256")
    if meta["files"].get(WEIGHTS) != meta["model"].get("weights_sha256"):
        problems.append("the index was built from a different model than the weights in this bundle")
    if meta["index"]["dim"] != meta["model"]["embedding_dim"]:
        problems.append(f"index dimension {meta['index']['dim']} != model embedding dimension {meta['model']['embedding_dim']}")
    if problems:
        raise ImgsimError(f"bundle {folder} is inconsistent: {'; '.join(problems)}. Re-export the bundle from one "
                          "extract run so that model and index match.")
    return meta


def load_bundle(folder: str | Path) -> tuple[dict, ModelBundle, IndexBundle]:
    """Verify, then load the model and the memory-mapped index."""
    meta = verify_bundle(folder)
    model = ModelBundle.load(folder)
    index = IndexBundle.load(folder, n_trees=meta["index"]["n_trees"])
    if model.args.dim != index.dim or len(index.items) != meta["index"]["count"]:
        raise ImgsimError(f"bundle {folder}: model dimension {model.args.dim}, index dimension {index.dim}, "
                          f"{len(index.items)} items (metadata says {meta['index']['count']}); re-export the bundle")
    return meta, model, index
