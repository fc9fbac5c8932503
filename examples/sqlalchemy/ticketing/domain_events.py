"""Collect domain events on entities during a unit of work; raise them in the same transaction.

The entities only *record* events (plain Python objects, no I/O). A session hook turns what a
flush wrote into one ``domain_events.raise_events(...)`` call on the flush's own connection, so
the events are part of the business transaction: they commit with it or vanish with its rollback.
This replaces the "collect, commit, then flush to an event store" order, which loses events when
the process dies between the commit and the flush, and can record events of rolled-back work.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, event, inspect, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, UOWTransaction, sessionmaker
from sqlalchemy.orm.attributes import flag_dirty

# Orders events across aggregates by when the domain recorded them, not by flush order.
_recorded = itertools.count()

# One statement for the whole batch. Typing the parameter as JSONB lets SQLAlchemy serialise the
# list and the psycopg dialect send it as jsonb (it renders the cast itself).
RAISE_EVENTS = text(
    "SELECT id, position, aggregate_version FROM domain_events.raise_events(:events)"
).bindparams(bindparam("events", type_=JSONB))

# session.info key: one entry per raise_events call of the session's transaction, for diagnostics.
RAISED = "domain_events.raised"


@dataclass(frozen=True)
class DomainEvent:
    event_type: str
    payload: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    sequence: int = field(default_factory=lambda: next(_recorded))


class HasDomainEvents:
    """Mixin for mapped classes that are aggregates.

    Subclasses set ``__aggregate_type__`` and may override ``aggregate_id`` (default: ``self.id``).
    The id is read at flush time, after the INSERT, so database-generated ids work.
    """

    __aggregate_type__: str

    @property
    def aggregate_id(self) -> str | int:
        return self.id  # type: ignore[attr-defined]

    def record_event(self, event_type: str, payload: dict[str, Any], **metadata: Any) -> None:
        # Not a mapped attribute, and kept in __dict__ because SQLAlchemy does not call __init__
        # for rows it loads.
        self.__dict__.setdefault("_domain_events", []).append(
            DomainEvent(event_type, payload, metadata)
        )
        # An event without any column change must still reach the flush. Only a persistent
        # object needs the flag: a new one is in session.new until its INSERT anyway.
        if inspect(self).persistent:
            flag_dirty(self)

    def pull_events(self) -> list[DomainEvent]:
        return self.__dict__.pop("_domain_events", [])


def _raise_collected_events(session: Session, flush_context: UOWTransaction) -> None:
    # after_flush: the rows are written (ids assigned) and session.new/dirty/deleted still
    # list what this flush handled.
    batch: list[tuple[DomainEvent, HasDomainEvents]] = []
    for obj in itertools.chain(session.new, session.dirty, session.deleted):
        if isinstance(obj, HasDomainEvents):
            batch.extend((e, obj) for e in obj.pull_events())
    if not batch:
        return
    batch.sort(key=lambda item: item[0].sequence)
    events = [
        {
            "aggregate_type": aggregate.__aggregate_type__,
            "aggregate_id": aggregate.aggregate_id,
            "event_type": e.event_type,
            "payload": e.payload,
            "metadata": e.metadata,
        }
        for e, aggregate in batch
    ]
    # The flush's own connection, hence its transaction (and savepoint, under begin_nested()).
    rows = session.connection().execute(RAISE_EVENTS, {"events": events}).all()
    session.info.setdefault(RAISED, []).append(
        [
            (ev["aggregate_type"], ev["aggregate_id"], ev["event_type"], row.aggregate_version)
            for ev, row in zip(events, rows)
        ]
    )


def _forget(session: Session) -> None:
    # What was raised is gone with the transaction.
    session.info.pop(RAISED, None)


def install(session_class: sessionmaker[Session] | type[Session]) -> None:
    """Registers the hooks on a Session class or sessionmaker (idempotent)."""
    if not event.contains(session_class, "after_flush", _raise_collected_events):
        event.listen(session_class, "after_flush", _raise_collected_events)
        event.listen(session_class, "after_rollback", _forget)
