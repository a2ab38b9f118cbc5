"""Provision the Prefect server with the tag concurrency limits skyvault's tasks rely on.

Prefect treats a tag without a limit as unlimited, so every tag a skyvault task carries gets one
here: the tags of ``settings.concurrency.tag_limits`` (``lts-read``, ``lts-write``,
``object-store-read``, ``object-store-write``, ``catalog-write``, ``data-catalog``). A tag limit
is the global concurrency limit named ``tag:<tag>``. Provisioning is an upsert: a missing limit is
created, one with another value or switched off is updated, and running it again changes nothing.
The ``skyvault`` command runs it before every flow; run it once for a server that deployments use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from skyvault.config.settings import Settings


def limit_name(tag: str) -> str:
    """The name of the global concurrency limit Prefect applies to task runs tagged ``tag``."""
    return f"tag:{tag}"


def tag_limits(settings: Settings) -> dict[str, int]:
    """Every tag concurrency limit skyvault needs, by tag."""
    return dict(settings.concurrency.tag_limits)


@dataclass(frozen=True)
class Provisioned:
    """What provisioning did: the limits by tag, and which tags it created or changed."""

    limits: dict[str, int]
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)


def provision_tag_limits(settings: Settings) -> Provisioned:
    """Create or update the tag concurrency limits on the current Prefect API (an upsert)."""
    limits = tag_limits(settings)
    created: list[str] = []
    updated: list[str] = []
    with get_client(sync_client=True) as client:
        for tag, limit in sorted(limits.items()):
            name = limit_name(tag)
            try:
                existing = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True)
                    )
                except ObjectAlreadyExists:  # another process created it since it was read
                    existing = client.read_global_concurrency_limit_by_name(name)
                else:
                    created.append(tag)
                    continue
            if existing.limit != limit or not existing.active:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=limit, active=True)
                )
                updated.append(tag)
    return Provisioned(limits=limits, created=created, updated=updated)
