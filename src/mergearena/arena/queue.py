"""The job queue is the submissions table: workers claim rows with leases.

A claim is one ``UPDATE ... WHERE id = (oldest claimable) AND <still claimable> RETURNING id``,
so two workers never get the same job: SQLite serializes writers, and PostgreSQL's
``FOR UPDATE SKIP LOCKED`` lets many workers on many machines claim side by side without waiting
on each other. A running job carries a lease that its worker renews; a worker that dies stops
renewing, the lease expires, and the job is claimed again, once (``MAX_ATTEMPTS``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import CursorResult, Update, and_, or_, select, update
from sqlalchemy.orm import Session

from mergearena.arena.db import Submission, utcnow

MAX_ATTEMPTS = 2  # the first run and one retry after a lost worker


def _claimable(now: dt.datetime):  # noqa: ANN202 - a SQL expression
    return and_(
        Submission.attempts < MAX_ATTEMPTS,
        or_(
            Submission.status == "queued",
            and_(Submission.status == "running", Submission.lease_expires_at < now),
        ),
    )


def _held_by(submission_id: int, worker: str) -> tuple:
    """The job is still running under ``worker``'s lease (not taken over by another)."""
    return (
        Submission.id == submission_id,
        Submission.lease_owner == worker,
        Submission.status == "running",
    )


def _commit_update(session: Session, statement: Update) -> int:
    """Run an UPDATE, commit it, and return how many rows it changed."""
    # Session.execute is typed to return a plain Result for every statement, but an UPDATE
    # without RETURNING gives a CursorResult, the type that carries rowcount.
    result = cast(CursorResult[Any], session.execute(statement))
    session.commit()
    return result.rowcount


def fail_abandoned(session: Session) -> int:
    """Mark jobs failed whose worker was lost on every allowed attempt; returns how many."""
    now = utcnow()
    return _commit_update(
        session,
        update(Submission)
        .where(
            Submission.status == "running",
            Submission.lease_expires_at < now,
            Submission.attempts >= MAX_ATTEMPTS,
        )
        .values(
            status="failed",
            finished_at=now,
            lease_owner=None,
            error=f"the worker running this job was lost {MAX_ATTEMPTS} times; "
            "the organizer can rerun it",
        ),
    )


def claim(session: Session, worker: str, lease_seconds: float) -> Submission | None:
    """Atomically take the oldest claimable job for ``worker``; None when there is none."""
    fail_abandoned(session)
    now = utcnow()
    oldest = (
        select(Submission.id)
        .where(_claimable(now))
        .order_by(Submission.created_at, Submission.id)
        .limit(1)
    )
    if session.get_bind().dialect.name == "postgresql":
        oldest = oldest.with_for_update(skip_locked=True)
    claimed = session.scalar(
        update(Submission)
        .where(Submission.id == oldest.scalar_subquery(), _claimable(now))
        .values(
            status="running",
            lease_owner=worker,
            lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
            attempts=Submission.attempts + 1,
            started_at=now,
        )
        .returning(Submission.id)
    )
    session.commit()
    return None if claimed is None else session.get(Submission, claimed)


def renew(session: Session, submission_id: int, worker: str, lease_seconds: float) -> bool:
    """Extend the lease; False if the job is no longer this worker's (it was taken over)."""
    return bool(
        _commit_update(
            session,
            update(Submission)
            .where(*_held_by(submission_id, worker))
            .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds)),
        )
    )


def finish(
    session: Session,
    submission_id: int,
    worker: str,
    *,
    status: str,
    log: str,
    scores: dict[str, float] | None = None,
    average: float | None = None,
    error: str | None = None,
    costs: dict[str, Any] | None = None,
) -> bool:
    """Record a job's outcome if the worker still holds it; False if another worker took it."""
    changed = _commit_update(
        session,
        update(Submission)
        .where(*_held_by(submission_id, worker))
        .values(
            status=status,
            log=log,
            scores=scores,
            average=average,
            error=error,
            costs=costs,
            finished_at=utcnow(),
            lease_owner=None,
            lease_expires_at=None,
        ),
    )
    return bool(changed)
