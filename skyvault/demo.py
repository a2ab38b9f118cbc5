"""``python -m skyvault.demo``: the pipeline end to end on the embedded default.

Makes sample products in a local landing folder, runs ingest with an ephemeral Prefect server, a
local folder as object store and a static STAC catalog, and prints what happened and where the
COGs, the catalog and the tiles are.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from skyvault.errors import IngestFailedError
from skyvault.models import IngestSummary

DEFAULT_ROOT = Path("skyvault-data/demo")


def prepare(root: Path, *, broken: bool = True) -> Path:
    """Write the demo config file and the sample products below ``root``; returns the config path."""
    from skyvault.samples import COLLECTIONS, write_samples
    from skyvault.storage.store import LocalStore

    root.mkdir(parents=True, exist_ok=True)
    config = root / "skyvault.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "scratch_dir": str((root / "scratch").resolve()),
                "store": {"kind": "local", "root": str((root / "store").resolve())},
                "lts": {"root": str((root / "lts").resolve()), "create_root": True},
                "catalog": {"backend": "static", "id": "skyvault-demo", "title": "skyvault demo catalog"},
                "collections": COLLECTIONS,
            },
            sort_keys=False,
        )
    )
    store = LocalStore(root / "store")
    if not any(store.list("landing/")):
        write_samples(store, broken=broken)
    return config


def report(summary: IngestSummary, root: Path) -> str:
    """The text the demo prints: counts, one line per product, and where the outputs are."""
    store = (root / "store").resolve()
    lines = [
        "",
        f"skyvault demo: {summary.headline()}",
        "",
        f"{'collection':<12} {'product':<20} {'state':<8} {'tiles':>5}  message",
    ]
    for o in summary.outcomes:
        lines.append(f"{o.collection:<12} {o.product_id:<20} {o.state:<8} {o.tiles:>5}  {o.message}")
    n_tiles = sum(1 for _ in (store / "tiles").rglob("*.png")) if (store / "tiles").exists() else 0
    lines += [
        "",
        f"COGs:     {store / 'cogs'}",
        f"catalog:  {store / 'catalog' / 'catalog.json'}",
        f"tiles:    {store / 'tiles'}  ({n_tiles} PNG tiles)",
        f"landing:  {store / 'landing'}  (sources are kept)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code (0 even when the deliberate broken sample fails)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="demo folder (default %(default)s)")
    parser.add_argument("--no-broken", action="store_true", help="leave out the deliberately corrupt sample")
    args = parser.parse_args(argv)
    root: Path = args.root
    config = prepare(root, broken=not args.no_broken)
    os.environ["SKYVAULT_CONFIG_FILE"] = str(config.resolve())

    from prefect.settings import temporary_settings

    from skyvault.config.local_server import local_server_settings, reclaiming_expired_leases
    from skyvault.config.provision import provision_tag_limits
    from skyvault.config.settings import get_settings
    from skyvault.flows.ingest import ingest

    with temporary_settings(updates=local_server_settings()):
        provision_tag_limits(get_settings())
        with reclaiming_expired_leases():
            state = ingest(return_state=True)
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, IngestFailedError):
        summary = summary.summary
    if not isinstance(summary, IngestSummary):
        print(f"ingest failed: {state.message}")
        return 1
    print(report(summary, root))
    return 0 if summary.done + summary.skipped > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
