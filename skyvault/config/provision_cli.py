"""``skyvault-provision``: the config job that sets up a Prefect server for one environment.

Examples::

    skyvault-provision --env dev --dry-run          # print what would change
    skyvault-provision --env prod                   # create or update it
    skyvault-provision --env prod --release-stale-slots

Reads ``<config-dir>/<env>.yaml`` with its ``SKYVAULT_PROVISION__...`` overrides and secret files
(:mod:`skyvault.config.environment`), compares it with the server named by ``PREFECT_API_URL`` and
prints the plan: variables, Secret blocks, prefect-aws blocks, tag limits, work pools and the
crash-detection automation to create or update (``no changes`` when the server already
matches). Without ``--dry-run`` it then applies the changes. Exit codes: 0 done, 1 a change failed
(the message names it), 2 nothing was tried (invalid configuration, a missing secret file, no or
unreachable Prefect server).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from skyvault.errors import ConfigError, SkyvaultError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skyvault-provision",
        description="Create or update what skyvault needs on a Prefect server (the config job).",
    )
    parser.add_argument("--env", required=True, help="environment: reads <config-dir>/<env>.yaml")
    parser.add_argument("--config-dir", type=Path, default=Path("config"))
    parser.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    parser.add_argument(
        "--release-stale-slots",
        action="store_true",
        help="give back the tag slots of expired leases and report the slots still held",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Provision one environment; returns the exit code (see the module docstring)."""
    args = _parser().parse_args(argv)
    return provision(
        args.env,
        args.config_dir,
        environ=os.environ,
        dry_run=args.dry_run,
        release_stale_slots=args.release_stale_slots,
    )


def provision(
    env: str,
    config_dir: Path,
    *,
    environ: Mapping[str, str],
    dry_run: bool = False,
    release_stale_slots: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Plan, print and (unless ``dry_run``) apply the provisioning of ``env``; the exit code."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from skyvault.config.environment import load_environment
    from skyvault.config.provision import apply_plan, plan_environment

    out = out or sys.stdout
    err = err or sys.stderr
    api_url = PREFECT_API_URL.value()
    if not api_url:
        print(
            "skyvault-provision: PREFECT_API_URL is not set: name the Prefect server to provision", file=err
        )
        return 2
    try:
        environment = load_environment(env, config_dir, environ)
    except ConfigError as e:
        print(f"skyvault-provision: {e}", file=err)
        return 2
    with get_client(sync_client=True) as client:
        unhealthy = client.api_healthcheck()
    if unhealthy is not None:
        print(f"skyvault-provision: cannot reach the Prefect server at {api_url}: {unhealthy}", file=err)
        return 2
    print(f"skyvault-provision: environment {env} ({environment.file}) on {api_url}", file=err)
    for name in environment.overrides:
        print(f"skyvault-provision: override from {name}", file=err)
    try:
        plan = plan_environment(environment)
        print(plan.render(), file=out)
        if dry_run:
            print("dry run: nothing changed", file=out)
        elif plan.changes:
            done = apply_plan(plan)
            print(f"applied {len(done)} change(s)", file=out)
        if release_stale_slots:
            print(release_stale_slots_report(environment.tag_limits), file=out)
    except SkyvaultError as e:
        print(f"skyvault-provision: {e}", file=err)
        return 1
    return 0


def release_stale_slots_report(tags: Mapping[str, int]) -> str:
    """Release the slots of expired leases on the tags' limits and say what is still held."""
    from skyvault.config.provision import release_stale_slots

    return release_stale_slots(tags).render()


if __name__ == "__main__":
    sys.exit(main())
