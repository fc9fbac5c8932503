"""Runs the ticket example against DATABASE_URL and checks what the database holds afterwards.

1. A committed unit of work opens a ticket and moves it to "verified": its two events are stored
   in order, versions 1 and 2, written by ONE raise_events call.
2. A later unit of work closes it: version 3.
3. A unit of work that fails after its events were collected (and even flushed) leaves no
   ticket and no event.

Exits non-zero when an expectation fails.
"""

from __future__ import annotations

import os
import sys
import uuid

from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from ticketing.db import create_schema, engine_from_url, session_factory, unit_of_work
from ticketing.domain_events import RAISED
from ticketing.models import InvalidTransition, Ticket


class CheckFailed(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


def stored_events(engine: Engine, ticket_id: int) -> list[tuple[str, int, dict, dict]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT event_type, aggregate_version, payload, metadata"
                " FROM domain_events.aggregate_events('ticket', :id)"
            ),
            {"id": str(ticket_id)},
        )
        return [tuple(row) for row in rows]


def committed_unit_of_work(engine: Engine, sessions: sessionmaker[Session], run: str) -> int:
    correlation_id = f"req-{run}"
    with unit_of_work(sessions, actor="dev-1", correlation_id=correlation_id) as session:
        ticket = Ticket.open(f"Printer on fire ({run})")
        session.add(ticket)
        ticket.change_status("verified", assignee_id="dev-1")
    # Committed: the session's info still tells what its hook raised.
    batches = session.info.get(RAISED, [])
    print(f"ticket {ticket.id}: raise_events calls {batches}")
    check(len(batches) == 1, f"one raise_events call for the unit of work, got {len(batches)}")
    check([b[3] for b in batches[0]] == [1, 2], f"versions 1, 2 in one batch, got {batches[0]}")

    events = stored_events(engine, ticket.id)
    check(len(events) == 2, f"two events stored, got {events}")
    (t1, v1, p1, m1), (t2, v2, p2, m2) = events
    check((t1, v1) == ("ticket.created", 1), f"first event, got {t1} v{v1}")
    check(p1 == {"title": ticket.title, "status": "submitted"}, f"created payload, got {p1}")
    check((t2, v2) == ("ticket.status_changed", 2), f"second event, got {t2} v{v2}")
    expected = {"old_status": "submitted", "new_status": "verified", "assignee_id": "dev-1"}
    check(p2 == expected, f"status_changed payload, got {p2}")
    for m in (m1, m2):
        want = {"actor": "dev-1", "correlation_id": correlation_id, "source": "core"}
        check(m == want, f"metadata {want}, got {m}")
    print(
        f"  ok: ticket.created v1, ticket.status_changed v2 committed with the ticket; metadata {m1}"
    )
    return ticket.id


def later_unit_of_work(engine: Engine, sessions: sessionmaker[Session], ticket_id: int) -> None:
    with unit_of_work(sessions, actor="dev-2") as session:
        # Loaded from the database: no __init__ ran, the mixin still collects.
        ticket = session.get_one(Ticket, ticket_id)
        ticket.change_status("closed")
    event_type, version, payload, metadata = stored_events(engine, ticket_id)[-1]
    check(
        (event_type, version) == ("ticket.status_changed", 3),
        f"third event, got {event_type} v{version}",
    )
    check(
        payload == {"old_status": "verified", "new_status": "closed", "assignee_id": "dev-1"},
        f"got {payload}",
    )
    check(metadata.get("actor") == "dev-2", f"actor of the second unit of work, got {metadata}")
    print(f"  ok: ticket {ticket_id} closed: ticket.status_changed v3 by {metadata['actor']}")


def failed_unit_of_work(engine: Engine, sessions: sessionmaker[Session], run: str) -> None:
    title = f"Doomed ticket ({run})"
    ticket_id = None
    try:
        with unit_of_work(sessions, actor="dev-1") as session:
            ticket = Ticket.open(title)
            session.add(ticket)
            session.flush()  # the INSERT and ticket.created are now written, not yet committed
            ticket_id = ticket.id
            version = session.scalar(
                select(func.domain_events.aggregate_version("ticket", str(ticket_id)))
            )
            check(
                version == 1, f"inside the transaction ticket.created exists, got version {version}"
            )
            ticket.change_status("closed")  # submitted -> closed: a domain error
    except InvalidTransition as err:
        print(f"ticket {ticket_id} ({title!r}): unit of work failed as intended: {err}")
    else:
        raise CheckFailed("the invalid transition was accepted")

    check(stored_events(engine, ticket_id) == [], "no event of the rolled-back ticket")
    with sessions() as session:
        check(session.get(Ticket, ticket_id) is None, "no row of the rolled-back ticket")
        count = session.scalar(
            select(func.count()).select_from(Ticket).where(Ticket.title == title)
        )
        check(count == 0, f"no ticket titled {title!r}")
    print("  ok: neither the ticket nor its event exists")


def main() -> int:
    url = os.environ.get("DATABASE_URL")
    if not url:
        print("set DATABASE_URL, e.g. postgres://postgres@127.0.0.1:54329/mydb", file=sys.stderr)
        return 2
    engine = engine_from_url(url)
    try:
        create_schema(engine)
        sessions = session_factory(engine)
        # A run tag keeps titles distinct, so the example can run again on the same database.
        run = uuid.uuid4().hex[:8]
        ticket_id = committed_unit_of_work(engine, sessions, run)
        later_unit_of_work(engine, sessions, ticket_id)
        failed_unit_of_work(engine, sessions, run)
    except CheckFailed as err:
        print(f"sqlalchemy example FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print("sqlalchemy example: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
