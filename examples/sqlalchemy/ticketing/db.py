"""Engine, sessions and the unit of work."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, func, make_url, select, text
from sqlalchemy.orm import Session, sessionmaker

from . import domain_events
from .models import Base


def engine_from_url(database_url: str) -> Engine:
    # DATABASE_URL is libpq-style (postgres://...); SQLAlchemy names the driver in the scheme.
    return create_engine(make_url(database_url).set(drivername="postgresql+psycopg"))


def create_schema(engine: Engine) -> None:
    # A real application would use Alembic; create_all keeps the example self-contained.
    with engine.begin() as conn:
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_domain_events"))
    Base.metadata.create_all(engine)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    factory = sessionmaker(engine, expire_on_commit=False)
    domain_events.install(factory)
    return factory


@contextmanager
def unit_of_work(
    sessions: sessionmaker[Session], actor: str, correlation_id: str | None = None
) -> Iterator[Session]:
    """One transaction: commits on success, rolls back (rows and events) on any exception."""
    with sessions.begin() as session:
        # Stamped on every event of this transaction whose own metadata lacks them;
        # set_config(..., true) is SET LOCAL with bind parameters.
        session.execute(
            select(
                func.set_config("domain_events.actor", actor, True),
                func.set_config(
                    "domain_events.correlation_id", correlation_id or str(uuid.uuid4()), True
                ),
            )
        )
        yield session
