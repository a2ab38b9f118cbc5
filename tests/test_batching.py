from __future__ import annotations

from skyvault.batching import batch_size, plan_runs
from skyvault.models import Product


def _product(collection: str, pid: str, size: int | None) -> Product:
    return Product(
        collection=collection, id=pid, source_key=f"landing/{collection}/{pid}.tif", source_size=size
    )


def test_runs_group_small_products_of_one_collection() -> None:
    products = [
        _product("a", "A1", 10),
        _product("a", "A2", 10),
        _product("a", "BIG", 10_000),
        _product("a", "A3", 10),
        _product("a", "A4", 10),
        _product("b", "B1", 10),
        _product("b", "UNLISTED", None),
        _product("b", "B2", 10),
    ]
    runs = [[p.id for p in run] for run in plan_runs(products, 3, 100)]
    assert runs == [["BIG"], ["A1", "A2", "A3"], ["A4"], ["UNLISTED"], ["B1", "B2"]]
    assert [[p.id for p in run] for run in plan_runs(products, 1, 100)] == [[p.id] for p in products]
    # batches only past twice as many small products as runs at a time, never over the cap
    assert [batch_size(n, 4, 16) for n in (1, 4, 8, 9, 64, 65, 1000)] == [1, 1, 1, 3, 16, 16, 16]
    assert batch_size(1000, 4, 1) == 1
