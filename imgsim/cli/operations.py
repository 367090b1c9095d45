"""Living with a deployment: gallery changes, duplicates, rollout and the search page."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from imgsim import config
from imgsim.errors import ImgsimError


def _gallery_add(ns):
    from imgsim.runs.gallery import run_gallery_add
    from imgsim.stages.settings import AddConfig
    _print_change(run_gallery_add(config.from_namespace(AddConfig, ns), ns.images or None))


def _gallery_remove(ns):
    from imgsim.runs.gallery import run_gallery_remove
    from imgsim.stages.settings import RemoveConfig
    _print_change(run_gallery_remove(config.from_namespace(RemoveConfig, ns)))


def _print_change(summary: dict) -> None:
    for line in summary.pop("skipped"):
        print(f"  skipped {line}", file=sys.stderr)
    print(json.dumps(summary, indent=2))


def _duplicates(ns):
    from imgsim import duplicates
    if bool(ns.folder) == bool(ns.bundle):
        raise ImgsimError("give a folder of images or --bundle URI (one of them)")
    if ns.folder:
        report, root = duplicates.find_in_folder(ns.folder, ns.hash_distance), Path(ns.folder)
    else:
        from imgsim.runs import tracking
        from imgsim.runs.export import fetched_bundle
        tracking.setup()
        with fetched_bundle(ns.bundle) as folder:
            report, root = duplicates.find_in_bundle(folder, ns.hash_distance, ns.embedding_distance)
        root = Path(ns.root) if ns.root else root
    files = report.write(ns.out, root if root and Path(root).is_dir() else None)
    for path, why in report.skipped[:20]:
        print(f"  unreadable {path}: {why}", file=sys.stderr)
    print(json.dumps(report.counts() | {k: str(v) for k, v in files.items()}, indent=2))


def _rollout(ns):
    from imgsim.runs import rollout, tracking
    if ns.bundle.startswith(("runs:/", "models:/")):
        tracking.setup()
    result = rollout.rollout(ns.release, ns.bundle, namespace=ns.namespace, predictor=ns.predictor,
                             dry_run=ns.dry_run)
    print(json.dumps(result, indent=2))


def _ui(ns):
    from imgsim.serve.page import UiConfig, serve
    if ns.gallery_root and not Path(ns.gallery_root).is_dir():
        raise ImgsimError(f"--gallery-root {ns.gallery_root} is not a folder")
    # Flags win over IMGSIM_UI_* (as the chart sets them), which win over the defaults.
    cfg = UiConfig.from_env(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(UiConfig)})
    serve(dataclasses.replace(cfg, url=cfg.url.rstrip("/")), ns.host, ns.port)


def _tracking_users(ns):
    from imgsim.runs import access
    ids = access.Identities(ns.pipeline_user, ns.serving_user, ns.experiment, ns.model, ns.gallery)
    for line in access.set_up(ids):
        print(f"tracking-users: {line}")


def add_parsers(sub) -> None:
    """Living with a deployment: gallery changes, duplicates, rollout and the search page."""
    from imgsim import duplicates
    from imgsim.bundle_format import GALLERY_ALIAS, GALLERY_NAME
    from imgsim.serve.page import UiConfig
    from imgsim.stages.settings import AddConfig, RemoveConfig
    gallery = sub.add_parser("gallery", help="add or remove gallery images without retraining (a new bundle version)")
    actions = gallery.add_subparsers(dest="action", required=True)
    p = actions.add_parser("add", help="embed new images into a new gallery version; copies are skipped and reported")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files to add (or --folder DIR)")
    config.add_arguments(p, AddConfig)
    p.set_defaults(fn=_gallery_add)
    p = actions.add_parser("remove", help="remove images by id or path into a new gallery version")
    config.add_arguments(p, RemoveConfig)
    p.set_defaults(fn=_gallery_remove)
    p = sub.add_parser("duplicates", help="find exact and near-duplicate groups in a folder or a gallery")
    p.add_argument("folder", nargs="?", help="folder of images (perceptual hash)")
    p.add_argument("--bundle", help=f"or a gallery: folder, runs:/..., models:/{GALLERY_NAME}@{GALLERY_ALIAS} (hash + embedding)")
    p.add_argument("--root", help="with --bundle: where its images are, for the picture (default: the bundle's root)")
    p.add_argument("--hash-distance", type=int, default=duplicates.DEFAULT_HASH_DISTANCE,
                   help=f"most differing bits of 64 for a near copy (default {duplicates.DEFAULT_HASH_DISTANCE}; -1: exact only)")
    p.add_argument("--embedding-distance", type=float, default=duplicates.DEFAULT_EMBEDDING_DISTANCE,
                   help=f"with --bundle: largest cosine distance for a near copy (default {duplicates.DEFAULT_EMBEDDING_DISTANCE})")
    p.add_argument("--out", default="duplicates", help="folder for duplicates.csv and duplicates.png")
    p.set_defaults(fn=_duplicates)
    p = sub.add_parser("rollout", help="point a running SeldonDeployment at another bundle (rolling update)")
    p.add_argument("--release", required=True, help="the SeldonDeployment's name (the chart's full name)")
    p.add_argument("--bundle", required=True, help="s3://... / pvc://..., or runs:/ / models:/ whose artifact store the cluster reads")
    p.add_argument("--namespace", default="", help="default: the kube context's namespace")
    p.add_argument("--predictor", default="", help="only this predictor (default: all)")
    p.add_argument("--dry-run", action="store_true", help="let the API server validate the patch without applying it")
    p.set_defaults(fn=_rollout)
    p = sub.add_parser("tracking-users", help="one identity per role on the tracking server's basic-auth app "
                       "(idempotent; run as its admin)",
                       description="Creates (or re-passwords) the pipeline and serving identities, the experiment and "
                                   "the registered models where missing, and grants the pipeline EDIT and the serving "
                                   "pods READ on those three only. Run with MLFLOW_TRACKING_URI and the admin's "
                                   "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD set; the new passwords come "
                                   "from IMGSIM_PIPELINE_PASSWORD and IMGSIM_SERVING_PASSWORD.")
    for flag, default in (("--pipeline-user", "imgsim-pipeline"), ("--serving-user", "imgsim-serving"),
                          ("--experiment", "imgsim"), ("--model", "imgsim"), ("--gallery", GALLERY_NAME)):
        p.add_argument(flag, default=default, help="default: %(default)s")
    p.set_defaults(fn=_tracking_users)
    p = sub.add_parser("ui", help="a search page for a running server: drop an image, browse its neighbours",
                       epilog="Every setting can also come from IMGSIM_UI_<NAME> (IMGSIM_UI_GALLERY_ROOT, ...), as the "
                              "chart sets them; a flag wins.")
    config.add_arguments(p, UiConfig, config_flag=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8501, help="port to listen on (default: %(default)s)")
    p.set_defaults(fn=_ui, log_level="INFO")  # a server: its start and requests are worth seeing
