"""The drift audit of a MongoDB warehouse, as far as this machine reaches: no MongoDB server can
be installed here, so the warehouse is the scripted one the Mongo CDC tests use (real BSON
values: ObjectId `_id`s, Timestamps, decimals). The store and the model are real. Not run: the
real server's `find` and `$in` lookups of `PyMongoWarehouse`."""

from __future__ import annotations

from bson.decimal128 import Decimal128
from bson.objectid import ObjectId

from feature_pipeline.audit import Auditor, Drift
from feature_pipeline.connectors.cdc.mongo import map_change
from feature_pipeline.connectors.qdrant.sink import build_sync
from feature_pipeline.connectors.qdrant.store import FeatureStore
from feature_pipeline.connectors.warehouse import MongoWarehouse
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, read_jsonl
from .test_cdc_mongo import COLLECTIONS, ScriptedMongo

POSTS = read_jsonl(SAMPLES / "posts.jsonl")[:4]


def test_a_mongo_warehouse_is_audited_like_the_cdc_reads_it(settings: Settings) -> None:
    server = ScriptedMongo()
    ids = [ObjectId() for _ in POSTS]
    for _id, post in zip(ids, POSTS, strict=True):
        server.insert("posts", {**post, "_id": _id, "score": Decimal128("1.5")})
    # Index the warehouse from its change stream, as `cdc mongo` and the pipeline would.
    processor = DocumentProcessor(settings)
    events = [map_change(change, COLLECTIONS) for change in server.oplog]
    sync = build_sync(settings)
    sync.apply([processor.process_event(e) for e in events if e is not None])
    store = FeatureStore.open(settings)
    auditor = Auditor(store, processor, settings.model_for, store.collections(), page_size=2)
    warehouse = MongoWarehouse(server.connect(), COLLECTIONS)
    assert list(auditor.findings(warehouse)) == []

    # While the CDC is down: one post edited, one deleted, one inserted.
    server.update("posts", ids[0], content={"text": "Rewritten while nobody was listening."})
    server.delete("posts", ids[1])
    new = ObjectId()
    server.insert("posts", {**POSTS[2], "_id": new})
    found = {(f.drift, f.entry_id) for f in auditor.findings(warehouse)}
    assert found == {
        (Drift.OUTDATED, str(ids[0])),
        (Drift.EXTRA, str(ids[1])),
        (Drift.MISSING, str(new)),
    }

    # The repair events, applied, make it clean.
    repairs = [f.repair_event() for f in auditor.findings(warehouse)]
    sync.apply([processor.process_event(e) for e in repairs if e is not None])
    assert list(auditor.findings(warehouse)) == []
    cleaned = {p.payload["entry_id"] for p in store.scroll(DataType.POSTS.cleaned_collection)}
    assert cleaned == {str(ids[0]), str(ids[2]), str(ids[3]), str(new)}
