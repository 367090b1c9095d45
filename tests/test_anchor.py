"""What a server follows and trusts before it reads a bundle: the digest it was told to expect, and a version's
base only in the same registry or under the operator's base_root (the registry's own digests are checked against a
real authenticated tracking server in test_tracking_auth.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgsim.bundle_format import BUNDLE_JSON, BundleError
from imgsim.errors import redact
from imgsim.modelspec import file_sha256
from imgsim.runs import export, tracking


def bundle_folder(path: Path, base: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / BUNDLE_JSON).write_text(json.dumps({"files": {}, **({"base": base} if base else {})}))
    return path


def test_a_bundle_json_other_than_the_expected_one_is_refused_before_anything_is_read(tmp_path):
    folder = bundle_folder(tmp_path / "b")
    assert export.check_anchor(folder, str(folder), file_sha256(folder / BUNDLE_JSON)) is None
    with pytest.raises(BundleError, match=f"{BUNDLE_JSON} has sha256 .* not the .*{tracking.BUNDLE_SHA_TAG}"):
        export.resolve_bundle(str(folder), None, bundle_sha256="0" * 64)


@pytest.mark.parametrize("uri", ["s3://elsewhere/bundle", "https://attacker.example/b", "gs://b/x", "hdfs://n/x"])
def test_a_base_outside_the_registry_is_not_followed(tmp_path, uri):
    folder = bundle_folder(tmp_path / "b", {"uri": uri, "files": {"model.onnx": "0" * 64}})
    with pytest.raises(BundleError, match="outside the registry: a server follows a base only to models:/ or runs:/"):
        export._with_base(folder, "runs:/abc/bundle")


def test_a_local_base_is_followed_only_under_base_root(tmp_path):
    base = bundle_folder(tmp_path / "bases" / "v1")
    folder = bundle_folder(tmp_path / "b", {"uri": str(base), "files": {}})
    with pytest.raises(BundleError, match="outside the one this server may read bases from"):
        export._with_base(folder, "models:/g/2", tags=None, base_root="")
    with pytest.raises(BundleError, match="outside the one this server may read bases from"):
        export._with_base(folder, "models:/g/2", tags=None, base_root=str(tmp_path / "other"))
    assert export._with_base(folder, "models:/g/2", tags=None, base_root=str(tmp_path / "bases")) == folder
    # ...and there too a registered version's base must be the one the registry recorded.
    with pytest.raises(BundleError, match=f"base's {BUNDLE_JSON} .* {tracking.BASE_SHA_TAG}"):
        export._with_base(folder, "models:/g/2", tags={tracking.BASE_SHA_TAG: "0" * 64},
                          base_root=str(tmp_path / "bases"))
    tags = {tracking.BASE_SHA_TAG: file_sha256(base / BUNDLE_JSON)}
    assert export._with_base(folder, "models:/g/2", tags=tags, base_root=str(tmp_path / "bases")) == folder


def test_a_base_link_escaping_base_root_is_refused(tmp_path):
    outside = bundle_folder(tmp_path / "outside")
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "v1").symlink_to(outside)
    folder = bundle_folder(tmp_path / "b", {"uri": str(tmp_path / "bases" / "v1"), "files": {}})
    with pytest.raises(BundleError, match="outside the one this server may read bases from"):
        export._with_base(folder, "models:/g/2", base_root=str(tmp_path / "bases"))


def test_credentials_never_survive_in_a_uri_that_is_printed():
    assert redact("at http://bob:pw@mlflow:5000/x; https://tok@h/; postgresql://u:p@db/m") == \
        "at http://mlflow:5000/x; https://h/; postgresql://db/m"
    assert redact("models:/imgsim-gallery@serving s3://bucket/key") == "models:/imgsim-gallery@serving s3://bucket/key"


@pytest.mark.parametrize("value", ["AB" * 32, "ab" * 31, "not-a-digest", "ab" * 32 + "\n"])
def test_a_malformed_expected_digest_is_refused_at_start_not_as_a_bundle_that_never_matches(value):
    from imgsim.errors import ImgsimError
    from imgsim.serve.settings import ServiceConfig

    with pytest.raises(ImgsimError, match="bundle_sha256 must be a sha256 in 64 lowercase hex characters"):
        ServiceConfig(bundle_sha256=value)
    assert ServiceConfig(bundle_sha256="ab" * 32).bundle_sha256 == "ab" * 32
