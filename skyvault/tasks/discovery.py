"""Task adapters for :mod:`skyvault.discovery`."""

from __future__ import annotations

import datetime as dt

from prefect import task

from skyvault.config.collections import CollectionConfig
from skyvault.config.settings import LimitSettings, StoreSettings
from skyvault.discovery import landing
from skyvault.models import Discovery
from skyvault.tasks.policy import TASK_POLICY


@task(name="discover", **TASK_POLICY)
def discover(
    store: StoreSettings,
    collections: dict[str, CollectionConfig],
    *,
    collection: str | None = None,
    since: dt.datetime | None = None,
    pattern: str | None = None,
    limits: LimitSettings | None = None,
) -> Discovery:
    """Task: :func:`skyvault.discovery.landing.discover`."""
    return landing.discover(
        store, collections, collection=collection, since=since, pattern=pattern, limits=limits
    )


@task(name="products-from-report", **TASK_POLICY)
def products_from_report(
    store: StoreSettings,
    collections: dict[str, CollectionConfig],
    report_key: str,
    *,
    limits: LimitSettings | None = None,
) -> Discovery:
    """Task: :func:`skyvault.discovery.landing.products_from_report`."""
    return landing.products_from_report(store, collections, report_key, limits=limits)
