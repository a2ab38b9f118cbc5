"""The register flow: (re)build a catalog's items from the COGs, in bulk."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from skyvault.config.settings import collection_write_tag, get_settings
from skyvault.errors import InvalidRequestError, RegisterFailedError
from skyvault.models import RegisterReport, RegisterSummary
from skyvault.tasks.catalog import register_cogs
from skyvault.tasks.cog import list_cogs


def _register_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"register/{'all' if p.get('all_collections') else p.get('collection')}"


@flow(name="register", flow_run_name=_register_run_name)
def register(
    collection: str | None = None,
    product_ids: list[str] | None = None,
    all_collections: bool = False,
) -> State[RegisterReport]:
    """Write the items of a collection's COGs (or of ``product_ids`` only) to the catalog, in bulk.

    Items are built from each COG and its record in parallel and written ``catalog.batch_size``
    per catalog call, one batch after another per collection. With ``all_collections`` every
    configured collection is registered: after switching ``catalog.backend`` this fills the new
    catalog from the COGs. Items are upserted, so a re-run adds no duplicate. Ends like ingest:
    Completed, Completed named ``Partial`` when some items failed, Failed when none was written.
    """
    settings = get_settings()
    if all_collections == (collection is not None):
        raise InvalidRequestError("register needs either a collection or all_collections=True")
    if product_ids is not None and collection is None:
        raise InvalidRequestError("product_ids need the collection they belong to")
    ids_of = {collection: product_ids} if collection is not None else {c: None for c in settings.collections}
    summaries: list[RegisterSummary] = []
    for collection_id, wanted in ids_of.items():
        config = settings.collection(collection_id)
        ids = list(wanted) if wanted is not None else list_cogs(collection_id, settings.store)
        size = settings.catalog.batch_size * settings.catalog.build_workers
        write = register_cogs.with_options(tags={"catalog-write", collection_write_tag(collection_id)})
        parts = [
            write(config, ids[start : start + size], settings.catalog, settings.store)
            for start in range(0, len(ids), size)
        ]
        summaries.append(
            RegisterSummary(
                collection=collection_id,
                found=len(ids),
                registered=sum(p.registered for p in parts),
                created=sum(p.created for p in parts),
                failed={k: v for p in parts for k, v in p.failed.items()},
            )
        )
    report = RegisterReport.from_summaries(summaries)
    create_table_artifact(
        key="register-summary",
        table=[
            {
                "collection": s.collection,
                "found": s.found,
                "registered": s.registered,
                "new": s.created,
                "failed": len(s.failed),
                "first failure": next(iter(s.failed.values()), ""),
            }
            for s in summaries
        ],
        description=report.headline(),
    )
    if report.failed and not report.registered:
        return Failed(message=report.headline(), data=RegisterFailedError(report.headline(), report))
    if report.failed:
        return Completed(message=report.headline(), data=report, name="Partial")
    return Completed(message=report.headline(), data=report)
