"""Bad inputs fail only their own product, with a message naming it, and leave sources untouched."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import from_origin

from skyvault.catalog.registration import open_catalog
from skyvault.config.settings import Settings, StoreSettings
from skyvault.flows.ingest import ingest
from skyvault.models import IngestSummary
from skyvault.status import read_status
from skyvault.storage.store import ObjectStore, open_store
from tests.cog.test_convert import huge_header
from tests.conftest import write_raster

pytestmark = pytest.mark.usefixtures("prefect_harness")

BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<rep:browseReport xmlns:rep="http://ngeo.eo.esa.int/ngEO/browseReport/1.0">
 <rep:responsibleOrgName>&lol4;</rep:responsibleOrgName>
</rep:browseReport>
"""


def landing_snapshot(store: ObjectStore, root: Path) -> dict[str, str]:
    """Each landing object's sha256; a link is recorded by its target, never read through."""
    out = {}
    for o in store.list("landing/"):
        path = root / o.key
        out[o.key] = (
            str(path.readlink()) if path.is_symlink() else hashlib.sha256(store.get_bytes(o.key)).hexdigest()
        )
    return out


def test_each_bad_input_fails_alone(configure: Callable[..., Settings], tmp_path: Path) -> None:
    s = configure(StoreSettings(root=tmp_path / "store"), limits={"max_sidecar_bytes": 64 * 1024})
    store = open_store(s.store)
    src = tmp_path / "src"
    good = write_raster(
        src / "good.tif",
        np.full((3, 32, 32), 90, dtype="uint8"),
        transform=from_origin(5.0, 50.0, 0.01, 0.01),
        tags={"TIFFTAG_DATETIME": "2026:01:01 00:00:00"},
    )
    store.put_file("landing/demo-scenes/GOOD_1.tif", good)
    raw = good.read_bytes()
    store.put_bytes("landing/demo-scenes/TRUNCATED_1.tif", raw[: len(raw) // 4])
    store.put_bytes("landing/demo-scenes/ZERO_1.tif", b"")
    nocrs = write_raster(src / "nocrs.tif", np.ones((1, 16, 16), dtype="uint8"), crs=None)
    store.put_file("landing/demo-scenes/NOCRS_1.tif", nocrs)
    store.put_bytes("landing/demo-scenes/MALFORMED_1.xml", b"<rep:browseReport><unclosed>")
    store.put_bytes("landing/demo-scenes/BOMB_1.xml", BOMB)
    store.put_file("landing/demo-scenes/bad..name.tif", good)
    store.put_file("landing/no-such-collection/ORPHAN_1.tif", good)
    store.put_file("landing/demo-dem/BADDATE_1.tif", good)
    store.put_bytes(
        "landing/demo-dem/BADDATE_1.json",
        json.dumps(
            {
                "collection_id": "demo-dem",
                "date": "the day after",
                "name": "BADDATE_1",
                "filename": "BADDATE_1.tif",
            }
        ).encode(),
    )
    # hostile input: a link out of the store, a header claiming 100000 x 100000 pixels, a sidecar
    # nested 900 levels deep and one larger than the configured limit
    outside = write_raster(
        tmp_path / "outside" / "secret.tif",
        np.full((3, 32, 32), 7, dtype="uint8"),
        transform=from_origin(5.0, 50.0, 0.01, 0.01),
    )
    (s.store.root / "landing" / "demo-scenes" / "LINKED_1.tif").symlink_to(outside)
    store.put_file("landing/demo-scenes/HUGE_1.tif", huge_header(src / "huge.tif"))
    store.put_file("landing/demo-scenes/DEEP_1.tif", good)
    store.put_bytes(
        "landing/demo-scenes/DEEP_1.json",
        b'{"name": "DEEP_1", "properties": ' + b"[" * 900 + b"]" * 900 + b"}",
    )
    store.put_file("landing/demo-scenes/BIGSIDE_1.tif", good)
    store.put_bytes(
        "landing/demo-scenes/BIGSIDE_1.json",
        json.dumps({"name": "BIGSIDE_1", "properties": {"pad": "x" * 100_000}}).encode(),
    )
    outside_before = outside.read_bytes()
    before = landing_snapshot(store, s.store.root)

    state = ingest(return_state=True, seed_tiles=False)
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, IngestSummary)
    assert state.name == "Partial"

    outcomes = {o.product_id: o for o in summary.outcomes}
    assert outcomes["GOOD_1"].state == "done"
    failed = {o.product_id: o.message for o in summary.outcomes if o.state == "failed"}
    expect = {
        "TRUNCATED_1": "TRUNCATED_1",
        "ZERO_1": "ZERO_1",
        "NOCRS_1": "NOCRS_1",
        "MALFORMED_1": "MALFORMED_1.xml",
        "BOMB_1": "BOMB_1.xml",
        "bad..name": "bad..name",
        "ORPHAN_1": "no-such-collection",
        "BADDATE_1": "BADDATE_1",
        "LINKED_1": "outside the store root",
        "HUGE_1": "limits.max_pixels",
        "DEEP_1": "limits.max_nesting_depth",
        "BIGSIDE_1": "limits.max_sidecar_bytes = 65536",
    }
    for needle, text in expect.items():
        hits = [pid for pid, msg in failed.items() if needle in pid or needle in msg]
        assert hits, f"no failure for {needle}: {failed}"
        assert any(text in failed[pid] or text in pid for pid in hits)
    assert "lollollol" not in json.dumps(failed)
    assert len(failed) == len(expect)
    # the summary names the step that failed; each product that ran has a status record saying so
    steps = {(o.collection, o.product_id): o.step for o in summary.outcomes if o.state == "failed"}
    assert steps[("demo-scenes", "TRUNCATED_1")] == steps[("demo-scenes", "NOCRS_1")] == "preprocess"
    assert {step for (_, pid), step in steps.items() if "MALFORMED_1" in pid or "BOMB_1" in pid} == {
        "discover"
    }
    for (collection, pid), step in steps.items():
        if step == "discover":
            continue
        record = read_status(collection, pid, s.store)
        assert record is not None
        assert (record.state, record.step) == ("failed", step)
        assert pid in record.message
    done = read_status("demo-scenes", "GOOD_1", s.store)
    assert done is not None
    assert (done.state, done.step) == ("done", "register")  # done without tiles (seeding was off)

    after = landing_snapshot(store, s.store.root)
    assert after == before
    assert outside.read_bytes() == outside_before
    assert [o.key for o in store.list("cogs/demo-scenes/")] == [
        "cogs/demo-scenes/GOOD_1.json",  # the COG's record: what it was made from
        "cogs/demo-scenes/GOOD_1.tif",
    ]
    ids = [i["id"] for i in open_catalog(s.catalog, s.store).search("demo-scenes")]
    assert ids == ["GOOD_1"]
