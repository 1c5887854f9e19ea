"""``genclip db upgrade|current``: the database schema (Alembic migrations)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from service.cli_settings import add_settings_flags, settings_from_args


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "db", help="database schema: upgrade to the newest, or show the current revision",
        description="Manage the schema of GENCLIP_DATABASE_URL (SQLite or PostgreSQL).",
    )
    parser.add_argument("action", choices=["upgrade", "current"],
                        help="upgrade: apply pending migrations (idempotent); current: print the revision")
    add_settings_flags(parser, ("database_url",))
    parser.set_defaults(func=main_db)


def main_db(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from service.db.engine import DatabaseConfigError, make_engine
    from service.db.migrate import current_revision, head_revision, upgrade_engine

    settings = settings_from_args(args)
    try:
        engine = make_engine(settings.database_url)
        try:
            if args.action == "upgrade":
                revision = upgrade_engine(engine)
                print(f"database at {revision} (head {head_revision()})")
            else:
                revision = current_revision(engine)
                state = "up to date" if revision == head_revision() else f"behind head {head_revision()}"
                print(f"{revision or '(empty)'}: {state}")
        finally:
            engine.dispose()
    except (DatabaseConfigError, SQLAlchemyError) as error:
        print(f"genclip db: {error}", file=sys.stderr)
        return 2
    return 0
