"""Provision the Prefect server with what skyvault's flows expect: tag concurrency limits.

Tags without a limit are silently unlimited in Prefect, so every tag skyvault uses gets one here:
``lts-read``, ``lts-write``, ``object-store-read``, ``object-store-write`` from
``settings.concurrency.tag_limits`` and one ``tileset:<collection>`` per configured collection.
"""

from __future__ import annotations

from prefect.client.orchestration import get_client

from skyvault.config.settings import Settings


def tileset_tag(collection_id: str) -> str:
    """The concurrency tag that keeps one seeder per tileset."""
    return f"tileset:{collection_id}"


def tag_limits(settings: Settings) -> dict[str, int]:
    """Every tag concurrency limit skyvault needs, by tag."""
    limits = dict(settings.concurrency.tag_limits)
    for collection_id in settings.collections:
        limits[tileset_tag(collection_id)] = settings.concurrency.tileset_limit
    return limits


def provision_tag_limits(settings: Settings) -> dict[str, int]:
    """Create or update the tag concurrency limits on the current Prefect API (an upsert)."""
    limits = tag_limits(settings)
    with get_client(sync_client=True) as client:
        for tag, limit in sorted(limits.items()):
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
    return limits
