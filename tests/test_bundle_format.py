"""bundle.json's typed records: what this imgsim writes, and what a newer one wrote, survive a read and a rewrite."""

from imgsim.bundle_format import BaseRef, Lineage, ModelSource, ShardInfo


def test_records_round_trip_and_keep_the_keys_they_do_not_know():
    model = {"uri": "models:/imgsim/3", "name": "imgsim", "version": "3", "fingerprint": "abc", "future": [1, 2]}
    assert ModelSource.from_json(model).to_json() == model
    assert ModelSource.from_json(model).extra == {"fingerprint": "abc", "future": [1, 2]}
    gallery = {"root": "/data", "run_id": "r", "parent": {"uri": "models:/g/1"}, "change": {"added": 2}, "note": "x"}
    assert Lineage.from_json(gallery).to_json() == gallery and Lineage.from_json(None).to_json() == {}
    shard = {"role": "shard", "index": 1, "count": 2, "gallery": "g", "items": 10, "shard_items": [5, 5],
             "next_id": 10, "labels": ["a"]}
    assert ShardInfo.from_json(shard).to_json() == shard
    assert list(ModelSource("u", name="n").to_json()) == ["uri", "name"]  # unset fields stay out, in order
    base = {"uri": "models:/g/1", "files": {"index.ann": "1"}, "count": 3}
    assert BaseRef.from_json(base).to_json() == base
