"""`fleet-payouts`: subcommands only; the logic lives in the modules they call."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import types
from collections.abc import Sequence
from datetime import UTC, date, datetime, time

from service.core import settings as settings_module
from service.core.settings import ConfigError, Settings
from service.core.values import parse_timestamp


def _settings(*, require_database: bool = True) -> Settings:
    try:
        return settings_module.load(os.environ, require_database=require_database)
    except ConfigError as exc:
        print(f"fleet-payouts: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _database_url() -> str:
    try:
        return settings_module.database_url(os.environ)
    except ConfigError as exc:
        print(f"fleet-payouts: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_migrate(args: argparse.Namespace) -> None:
    import psycopg

    from service.ops import migrate

    try:
        applied = asyncio.run(migrate.migrate(_database_url()))
    except (migrate.MigrationError, psycopg.Error) as exc:
        print(f"fleet-payouts migrate: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(
        f"migrate: applied {len(applied)} migration(s)"
        + (f": {', '.join(applied)}" if applied else "")
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from service.core import observability
    from service.web.lifecycle import serve

    settings = _settings()
    observability.setup(settings, "api")
    serve(settings, host=args.host, port=args.port)


def cmd_worker(args: argparse.Namespace) -> None:
    from service.core import observability
    from service.worker.run import run_worker

    settings = _settings()
    observability.setup(settings, "worker")
    asyncio.run(run_worker(settings, concurrency=args.concurrency, metrics_port=args.metrics_port))


def _devkit(command: str) -> types.ModuleType:
    """The dev kit (devkit/ in the repository), which the production image leaves out."""
    try:
        return importlib.import_module(f"fleet_payouts_devkit.{command}")
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("fleet_payouts_devkit"):
            raise
        raise SystemExit(
            "fleet-payouts: this command comes with the dev kit, which is not installed here;"
            " from a clone: pip install -e ./devkit (make setup does it)"
        ) from None


def cmd_emulator(args: argparse.Namespace) -> None:
    _devkit("emulator").run(args.host, args.port)


def cmd_dev(args: argparse.Namespace) -> None:
    raise SystemExit(_devkit("dev").run(port=args.port, billing_port=args.billing_port))


def cmd_parks_import(args: argparse.Namespace) -> None:
    from service.parks.csv_import import import_csv

    raise SystemExit(asyncio.run(import_csv(_database_url(), args.file)))


def cmd_audit_verify(args: argparse.Namespace) -> None:
    import psycopg

    from service.audit import chain as audit_chain
    from service.ops import checks

    try:
        code = asyncio.run(audit_chain.run(_database_url(), since=args.since, full=args.full))
        if args.since is None and code in (0, 1):
            # A whole-log verdict is what the alerts watch (AuditChainBroken,
            # AuditVerifyNotRunning): recorded where every worker exports it.
            detail = None if code == 0 else "broken link: see this run's output"
            asyncio.run(
                checks.record_run(_database_url(), checks.AUDIT_VERIFY, ok=code == 0, detail=detail)
            )
    except psycopg.Error as exc:
        # Not a verdict on the log: 1 means "broken", so a failure to look is 2.
        print(f"fleet-payouts audit verify: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)


def cmd_reconcile(args: argparse.Namespace) -> None:
    from service.core import observability
    from service.ops import reconcile

    settings = _settings()
    observability.setup(settings, "cli")
    raise SystemExit(asyncio.run(reconcile.main(settings, since=args.since, until=args.until)))


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError("a TCP port is 1-65535")
    return value


def _when(raw: str) -> datetime:
    """A day (its midnight, UTC) or an RFC 3339 timestamp with its zone."""
    try:
        if len(raw) == 10:
            return datetime.combine(date.fromisoformat(raw), time(), UTC)
        return parse_timestamp(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "expected a date (2024-05-01) or a timestamp with its zone (2024-05-01T12:00:00Z)"
        ) from None


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _date(raw: str) -> date:
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError("a date is YYYY-MM-DD") from None


def _listen_on(command: argparse.ArgumentParser, port: int) -> None:
    """The address an HTTP server of ours listens on: this host only unless told."""
    command.add_argument("--host", default="127.0.0.1")
    command.add_argument("--port", type=_port, default=port)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleet-payouts", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("migrate", help="bring the database schema to the current version")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("serve", help="run the HTTP API")
    _listen_on(s, 8080)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("worker", help="run a queue worker (periodic tasks included)")
    s.add_argument("--concurrency", type=_positive, default=10)
    s.add_argument("--metrics-port", type=_port, default=None)
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("billing-emulator", help="run the Billing emulator (a test double)")
    _listen_on(s, 8081)
    s.set_defaults(func=cmd_emulator)

    s = sub.add_parser("dev", help="the whole system on this machine, no set-up")
    s.add_argument("--port", type=_port, default=8080)
    s.add_argument("--billing-port", type=_port, default=8081)
    s.set_defaults(func=cmd_dev)

    s = sub.add_parser("parks", help="park registry tools")
    parks_sub = s.add_subparsers(dest="parks_command", required=True)
    i = parks_sub.add_parser("import", help="register or update parks from a CSV file")
    i.add_argument(
        "file",
        help="CSV: park_id[,instant_payouts_enabled,periodic_payouts_enabled,hold_reason]",
    )
    i.set_defaults(func=cmd_parks_import)

    s = sub.add_parser(
        "reconcile",
        help="compare our payouts with Billing's for a window; exit 1 on any mismatch",
    )
    s.add_argument("--since", type=_when, default=None, help="start (default: --until - 1 day)")
    s.add_argument("--until", type=_when, default=None, help="end, excluded (default: now)")
    s.set_defaults(func=cmd_reconcile)

    s = sub.add_parser("audit", help="audit log tools")
    audit_sub = s.add_subparsers(dest="audit_command", required=True)
    v = audit_sub.add_parser(
        "verify", help="walk the audit log's hash chains; exit 1 naming the first broken link"
    )
    v.add_argument(
        "--since", type=_date, default=None, help="start at the month of this date (YYYY-MM-DD)"
    )
    v.add_argument(
        "--full",
        action="store_true",
        help="walk every month again, also closed ones recorded intact whose heads are unchanged",
    )
    v.set_defaults(func=cmd_audit_verify)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)
