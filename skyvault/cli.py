"""``skyvault``: run a flow once from the command line (the same flows deployments run).

Examples::

    skyvault ingest --collection s2-l2a --since 2026-06-01T00:00:00Z
    skyvault seed s2-l2a --start 2026-06-01 --end 2026-06-30 --min-zoom 0 --max-zoom 8
    skyvault archive ds-0042 --source-dir /data/incoming/ds-0042
    skyvault retrieve ds-0042
    skyvault register --collection s2-l2a
    skyvault backup-catalog
    skyvault ingest-samples office
    skyvault seed-series office --start 2026-06-01T00:00:00Z --end 2026-07-01T00:00:00Z

With ``PREFECT_API_URL`` set, the run goes to that Prefect server; otherwise each call starts a
temporary local server for the run (about 20 s). Either way the command says which on stderr, and
provisions the tag concurrency limits the flows rely on before it starts the flow.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from pydantic import BaseModel

from skyvault.errors import RunFailedError, SkyvaultError

TEMPORARY_SERVER = "a temporary local Prefect server (set PREFECT_API_URL to use yours)"


def _bbox(text: str) -> tuple[float, float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("bbox is minx,miny,maxx,maxy")
    return parts[0], parts[1], parts[2], parts[3]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skyvault", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="flow", required=True)

    p = sub.add_parser("ingest", help="discover products in the landing zone and process each")
    p.add_argument("--collection")
    p.add_argument("--report", help="object key of one browse report or JSON sidecar")
    p.add_argument("--since", type=dt.datetime.fromisoformat)
    p.add_argument("--pattern")
    p.add_argument("--replace", action="store_true")
    p.add_argument("--no-seed", dest="seed_tiles", action="store_false")

    p = sub.add_parser("seed", help="render a collection's tiles for a time interval and zoom range")
    p.add_argument("collection")
    p.add_argument("--start", type=dt.datetime.fromisoformat)
    p.add_argument("--end", type=dt.datetime.fromisoformat)
    p.add_argument("--min-zoom", type=int)
    p.add_argument("--max-zoom", type=int)
    p.add_argument("--bbox", type=_bbox, help="minx,miny,maxx,maxy in lon/lat")
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("archive", help="archive a dataset to LTS")
    p.add_argument("dataset_id")
    p.add_argument("--source-prefix")
    p.add_argument("--source-dir")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep-landing", dest="keep_landing", action="store_true", default=None)
    keep.add_argument("--delete-landing", dest="keep_landing", action="store_false")

    p = sub.add_parser("retrieve", help="retrieve an archived dataset and print its download links")
    p.add_argument("dataset_id")

    p = sub.add_parser("register", help="write the items of COGs to the catalog in bulk (rebuild or move it)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--collection")
    which.add_argument(
        "--all", dest="all_collections", action="store_true", help="every configured collection"
    )
    p.add_argument("--product", dest="product_ids", action="append", help="only this product (repeatable)")

    sub.add_parser("backup-catalog", help="dump the pgstac catalog database to the object store")

    p = sub.add_parser("restore-catalog", help="restore a catalog dump into a fresh database and check it")
    p.add_argument("target_dsn", help="the empty database to restore into, postgresql://user@host:port/db")
    p.add_argument(
        "--dump", dest="dump_key", help="object key of the dump (default: the newest complete one)"
    )

    p = sub.add_parser(
        "ingest-samples", help="store a source's new sensor samples, then rebuild their series blocks"
    )
    p.add_argument("source")
    p.add_argument("--key", dest="keys", action="append", help="only this sample file (repeatable)")
    p.add_argument("--no-seed", dest="seed", action="store_false")

    p = sub.add_parser("seed-series", help="build a source's reduced series blocks for a time interval (UTC)")
    p.add_argument("source")
    p.add_argument("--start", type=dt.datetime.fromisoformat, required=True)
    p.add_argument("--end", type=dt.datetime.fromisoformat, required=True)
    p.add_argument(
        "--level", dest="levels", action="append", help="only this cache level, e.g. 60s (repeatable)"
    )
    return parser


#: Command → (module under skyvault.flows, flow function).
FLOWS: dict[str, tuple[str, str]] = {
    "ingest": ("ingest", "ingest"),
    "seed": ("seed", "seed"),
    "archive": ("archive", "archive"),
    "retrieve": ("retrieve", "retrieve"),
    "register": ("register", "register"),
    "backup-catalog": ("backup", "backup_catalog"),
    "restore-catalog": ("backup", "restore_catalog"),
    "ingest-samples": ("series", "ingest_samples"),
    "seed-series": ("series", "seed_series"),
}


def _flow(name: str) -> Callable[..., Any]:
    """The flow a command runs, importing only its module (seeding and ingest need GDAL, archive not)."""
    module_name, function = FLOWS[name]
    module = importlib.import_module(f"skyvault.flows.{module_name}")
    fn: Callable[..., Any] = getattr(module, function)
    return fn


def main(argv: list[str] | None = None) -> int:
    """Run one flow; print its result as JSON.

    Returns the exit code: 0 when the run and every product in it succeeded, 1 when something in
    it failed, 2 when it could not start (invalid settings, unreachable Prefect server).
    """
    args = vars(_parser().parse_args(argv))
    name = args.pop("flow")

    from prefect.settings import temporary_settings

    from skyvault.config.local_server import local_server_settings

    with temporary_settings(updates=local_server_settings()):
        return _run(name, args)


def _run(name: str, args: dict[str, Any]) -> int:
    import httpx
    from prefect.settings import PREFECT_API_URL

    from skyvault.config.local_server import reclaiming_expired_leases
    from skyvault.config.provision import provision_tag_limits
    from skyvault.config.settings import get_settings

    api_url = PREFECT_API_URL.value()
    server = f"the Prefect server at {api_url}" if api_url else TEMPORARY_SERVER
    print(f"skyvault: using {server}", file=sys.stderr)
    with ExitStack() as stack:
        try:
            provision_tag_limits(get_settings())
            stack.enter_context(reclaiming_expired_leases())
        except SkyvaultError as e:
            print(f"skyvault: {e}", file=sys.stderr)
            return 2
        except httpx.HTTPError as e:
            print(f"skyvault: cannot reach {server}: {e}", file=sys.stderr)
            return 2
        state = _flow(name)(**args, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, RunFailedError):
        print(f"{name} failed: {result}", file=sys.stderr)
        result = result.summary  # every part's outcome, as when only some failed
    if isinstance(result, BaseModel):
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    elif isinstance(result, list) and all(isinstance(r, BaseModel) for r in result):
        print(json.dumps([r.model_dump(mode="json") for r in result], indent=2))
    elif isinstance(result, BaseException):
        print(f"{name} failed: {result}")
    failed = getattr(result, "failed", 0)
    return 0 if state.is_completed() and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
