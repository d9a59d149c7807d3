"""Jobs, their events and their webhook outbox, on the shared database (:mod:`app.store.db`).

Every change of a job's status is one transaction that also writes its event and its webhook deliveries, so a crash
loses none and sends none for a change that did not happen. A job is claimed by a single conditional update with a
lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the database lock on SQLite): whoever holds the lease runs it, and
only the holder of the current lease can complete it, so a job never completes twice.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec
from sqlalchemy import Connection, Row, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from app.store.db import Database
from app.store.keys import UsageRow, add_usage
from app.store.schema import job_events, jobs, webhook_endpoints, webhook_outbox, webhook_secrets

Status = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
FINISHED = ("succeeded", "failed", "cancelled", "expired")
ACTIVE = ("queued", "running")
SERVER = "*"
"""The owner of the server's own webhook secret."""


class JobRecord(msgspec.Struct, kw_only=True):
    """A job as stored; ``request`` is the wire request (JSON), ``inputs`` the stored input files, in order."""

    id: str
    kind: str
    surface: str
    owner: str
    principal: str
    model: str
    status: str
    request: str
    inputs: list[str]
    n: int
    created_at: float
    deadline_at: float
    expires_at: float
    base_url: str
    idempotency_key: str | None = None
    request_hash: str | None = None
    attempts: int = 0
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    step: int | None = None
    total_steps: int | None = None
    started_at: float | None = None
    completed_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    result: str | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None


class EventRecord(msgspec.Struct, kw_only=True):
    id: int
    job_id: str
    type: str
    data: dict[str, Any]
    created_at: float


class Delivery(msgspec.Struct, kw_only=True):
    """One webhook message to one URL, retried until delivered, refused, gone or out of attempts."""

    id: str
    job_id: str
    owner: str
    url: str
    type: str
    payload: str
    status: str = "pending"
    attempts: int = 0
    next_attempt_at: float = 0.0
    created_at: float = 0.0
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None


Announce = Callable[[JobRecord], Sequence[Delivery]] | None
"""Makes the webhook deliveries that announce a job's change, from the changed job, inside its transaction."""


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request."""


_JSON_LISTS = ("inputs", "webhook_events")


def _job(row: Row | None) -> JobRecord | None:
    if row is None:
        return None
    data = row._asdict()
    for name in _JSON_LISTS:
        if data[name] is not None:
            data[name] = msgspec.json.decode(data[name])
    data["cancel_requested"] = bool(data["cancel_requested"])
    return JobRecord(**data)


def _job_values(job: JobRecord) -> dict[str, Any]:
    values = msgspec.structs.asdict(job)
    for name in _JSON_LISTS:
        if values[name] is not None:
            values[name] = msgspec.json.encode(values[name]).decode()
    return values


def _event(row: Row) -> EventRecord:
    return EventRecord(
        id=row.id, job_id=row.job_id, type=row.type, data=msgspec.json.decode(row.data), created_at=row.created_at
    )


def _delivery(row: Row) -> Delivery:
    return Delivery(**row._asdict())


def new_event(job_id: str, type: str, now: float, **data: Any) -> dict[str, Any]:
    return {"job_id": job_id, "type": type, "data": msgspec.json.encode(data).decode(), "created_at": now}


def new_delivery(job_id: str, owner: str, url: str, type: str, payload: bytes, now: float) -> Delivery:
    return Delivery(
        id=f"msg_{secrets.token_hex(12)}",
        job_id=job_id,
        owner=owner,
        url=url,
        type=type,
        payload=payload.decode(),
        next_attempt_at=now,
        created_at=now,
    )


class JobStore:
    """The queries of the job layer; each method is one transaction (call them in a thread)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- writes that change a job ----------------------------------------------------------------------------

    @staticmethod
    def _record(conn: Connection, events: Sequence[dict], deliveries: Sequence[Delivery]) -> None:
        if events:
            conn.execute(insert(job_events), list(events))
        if deliveries:
            conn.execute(insert(webhook_outbox), [msgspec.structs.asdict(d) for d in deliveries])

    def insert(
        self,
        job: JobRecord,
        events: Sequence[dict],
        deliveries: Sequence[Delivery],
        also: Callable[[Connection], None] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new job; with an idempotency key already used by the owner, the job stored then (created False).

        ``also`` writes what goes with the job (a training's or prediction's row) in the same transaction.

        Raises:
            IdempotencyConflict: the key was used with a different request.
        """
        try:
            with self.db.begin() as conn:
                conn.execute(insert(jobs).values(_job_values(job)))
                self._record(conn, events, deliveries)
                if also is not None:
                    also(conn)
            return job, True
        except IntegrityError:
            if job.idempotency_key is None:
                raise
        existing = self.db.read(
            lambda c: _job(
                c.execute(
                    select(jobs).where(jobs.c.owner == job.owner, jobs.c.idempotency_key == job.idempotency_key)
                ).first()
            )
        )
        if existing is None:  # deleted in between: nothing to return, and nothing of it to conflict with
            return self.insert(job, events, deliveries, also)
        if existing.request_hash != job.request_hash:
            raise IdempotencyConflict(job.idempotency_key)
        return existing, False

    def claim(
        self,
        worker: str,
        now: float,
        lease: float,
        models: Sequence[str],
        max_attempts: int,
        announce: Announce = None,
        kinds: Sequence[str] = (),
    ) -> JobRecord | None:
        """Take the oldest runnable job of ``models`` and ``kinds`` with a fresh lease.

        Runnable: queued, or running on an expired lease.
        """
        runnable = or_(
            and_(jobs.c.status == "queued", jobs.c.deadline_at > now),
            and_(
                jobs.c.status == "running",
                jobs.c.lease_expires_at < now,
                jobs.c.attempts < max_attempts,
                jobs.c.cancel_requested.is_(False),
            ),
        )
        pick = (
            select(jobs.c.id)
            .where(runnable, jobs.c.model.in_(list(models)), jobs.c.kind.in_(list(kinds)))
            .order_by(jobs.c.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        statement = (
            update(jobs)
            .where(jobs.c.id == pick, runnable)
            .values(
                status="running",
                lease_owner=worker,
                lease_expires_at=now + lease,
                attempts=jobs.c.attempts + 1,
                started_at=func.coalesce(jobs.c.started_at, now),
                step=None,
                total_steps=None,
            )
            .returning(*jobs.c)
        )
        with self.db.begin() as conn:
            job = _job(conn.execute(statement).first())
            if job is not None:
                started = new_event(job.id, "started", now, attempt=job.attempts)
                self._record(conn, [started], announce(job) if announce else ())
        return job

    def _held(self, job_id: str, worker: str):
        return and_(jobs.c.id == job_id, jobs.c.status == "running", jobs.c.lease_owner == worker)

    def renew(self, job_id: str, worker: str, until: float) -> bool | None:
        """Extend the lease; None when it is no longer this worker's, else whether a cancel was asked for."""
        with self.db.begin() as conn:
            row = conn.execute(
                update(jobs)
                .where(self._held(job_id, worker))
                .values(lease_expires_at=until)
                .returning(jobs.c.cancel_requested)
            ).first()
        return None if row is None else bool(row[0])

    def progress(
        self, job_id: str, worker: str, step: int, total: int, events: Sequence[dict], announce: Announce = None
    ) -> bool:
        """Record a step of the lease holder's run; False when the lease is no longer its."""
        statement = (
            update(jobs).where(self._held(job_id, worker)).values(step=step, total_steps=total).returning(*jobs.c)
        )
        with self.db.begin() as conn:
            job = _job(conn.execute(statement).first())
            if job is not None:
                self._record(conn, events, announce(job) if announce else ())
        return job is not None

    def release(self, job_id: str, worker: str, *, counted: bool = False) -> None:
        """Put a claimed job back in the queue.

        Its attempt is not counted (its model had no room after all) unless ``counted`` (its run was lost).
        """
        self.db.write(
            lambda c: c.execute(
                update(jobs)
                .where(self._held(job_id, worker))
                .values(
                    status="queued",
                    lease_owner=None,
                    lease_expires_at=None,
                    attempts=jobs.c.attempts - (0 if counted else 1),
                )
            )
        )

    def finish(
        self,
        job_id: str,
        status: Status,
        now: float,
        *,
        worker: str | None = None,
        from_status: Sequence[str] = ACTIVE,
        result: str | None = None,
        error: tuple[str, str] | None = None,
        events: Sequence[dict] = (),
        announce: Announce = None,
        usage: Sequence[UsageRow] = (),
        also: Callable[[Connection], None] | None = None,
    ) -> JobRecord | None:
        """End a job; only the lease holder (``worker``) can end a running job it runs. None if it could not.

        The job's event, its webhook deliveries (``announce`` makes them from the ended job), its usage and what
        ``also`` writes (a trained adapter) are written in the same transaction.
        """
        condition = and_(jobs.c.id == job_id, jobs.c.status.in_(list(from_status)))
        if worker is not None:
            condition = and_(condition, jobs.c.lease_owner == worker)
        values: dict[str, Any] = {"status": status, "completed_at": now, "lease_owner": None, "lease_expires_at": None}
        if result is not None:
            values["result"] = result
        if error is not None:
            values["error_code"], values["error_message"] = error
        with self.db.begin() as conn:
            job = _job(conn.execute(update(jobs).where(condition).values(values).returning(*jobs.c)).first())
            if job is not None:
                self._record(conn, events, announce(job) if announce else ())
                add_usage(conn, usage)
                if also is not None:
                    also(conn)
        return job

    def request_cancel(self, job_id: str) -> JobRecord | None:
        return self.db.write(
            lambda c: _job(
                c.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.status == "running")
                    .values(cancel_requested=True)
                    .returning(*jobs.c)
                ).first()
            )
        )

    def delete(self, job_ids: Sequence[str]) -> list[JobRecord]:
        """Delete jobs with their events and pending deliveries; returns those deleted (for their files)."""
        if not job_ids:
            return []
        with self.db.begin() as conn:
            gone = [
                j
                for j in map(_job, conn.execute(delete(jobs).where(jobs.c.id.in_(list(job_ids))).returning(*jobs.c)))
                if j is not None
            ]
            ids = [j.id for j in gone]
            conn.execute(delete(job_events).where(job_events.c.job_id.in_(ids)))
            conn.execute(
                delete(webhook_outbox).where(webhook_outbox.c.job_id.in_(ids), webhook_outbox.c.status == "pending")
            )
        return gone

    def add_events(self, events: Sequence[dict]) -> None:
        self.db.write(lambda c: self._record(c, events, ()))

    # -- reads -----------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        return self.db.read(lambda c: _job(c.execute(select(jobs).where(jobs.c.id == job_id)).first()))

    def list(
        self,
        owner: str | None,
        *,
        statuses: Sequence[str] | None = None,
        surface: str | None = None,
        kinds: Sequence[str] = (),
        after: JobRecord | None = None,
        limit: int = 20,
    ) -> list[JobRecord]:
        """Newest first, of ``kinds``; ``after`` is the last job of the previous page."""
        query = select(jobs).where(jobs.c.kind.in_(list(kinds)))
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        if statuses:
            query = query.where(jobs.c.status.in_(list(statuses)))
        if surface is not None:
            query = query.where(jobs.c.surface == surface)
        if after is not None:
            query = query.where(
                or_(
                    jobs.c.created_at < after.created_at,
                    and_(jobs.c.created_at == after.created_at, jobs.c.id < after.id),
                )
            )
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        return [j for j in self.db.read(lambda c: [_job(r) for r in c.execute(query)]) if j is not None]

    def ids(self, owner: str | None, kinds: Sequence[str], surface: str | None = None) -> list[str]:
        query = select(jobs.c.id).where(jobs.c.kind.in_(list(kinds)))
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        if surface is not None:
            query = query.where(jobs.c.surface == surface)
        return self.db.read(lambda c: list(c.execute(query).scalars()))

    def last_event(self, job_id: str, type: str) -> EventRecord | None:
        query = (
            select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.type == type)
            .order_by(job_events.c.id.desc())
            .limit(1)
        )
        row = self.db.read(lambda c: c.execute(query).first())
        return None if row is None else _event(row)

    def events(self, job_id: str, after: int = 0, type: str | None = None) -> list[EventRecord]:
        """The job's events after the event ``after``, oldest first (only those of ``type``, if given)."""
        query = (
            select(job_events).where(job_events.c.job_id == job_id, job_events.c.id > after).order_by(job_events.c.id)
        )
        if type is not None:
            query = query.where(job_events.c.type == type)
        return [_event(row) for row in self.db.read(lambda c: c.execute(query).all())]

    def reserved(self, owner: str) -> int:
        """Images that the owner's unfinished jobs hold against its quota."""
        query = select(func.coalesce(func.sum(jobs.c.n), 0)).where(jobs.c.owner == owner, jobs.c.status.in_(ACTIVE))
        return int(self.db.reader.execute(query).scalar_one())

    def lost(self, now: float, max_attempts: int) -> list[JobRecord]:
        """Running jobs whose lease expired and that may not run again (attempts spent, or a cancel asked)."""
        query = select(jobs).where(
            jobs.c.status == "running",
            jobs.c.lease_expires_at < now,
            or_(jobs.c.attempts >= max_attempts, jobs.c.cancel_requested.is_(True)),
        )
        return [j for j in self.db.read(lambda c: [_job(r) for r in c.execute(query)]) if j is not None]

    def overdue(self, now: float) -> list[JobRecord]:
        query = select(jobs).where(jobs.c.status == "queued", jobs.c.deadline_at <= now)
        return [j for j in self.db.read(lambda c: [_job(r) for r in c.execute(query)]) if j is not None]

    def expired(self, now: float, limit: int = 500) -> list[str]:
        query = select(jobs.c.id).where(jobs.c.expires_at <= now, jobs.c.status.in_(FINISHED)).limit(limit)
        return self.db.read(lambda c: list(c.execute(query).scalars()))

    def stats(self) -> tuple[dict[tuple[str, str], int], float | None, int]:
        """(kind, status) -> jobs, the creation time of the oldest queued job, and pending deliveries."""

        def go(c: Connection):
            counts = {
                (k, s): n
                for k, s, n in c.execute(
                    select(jobs.c.kind, jobs.c.status, func.count()).group_by(jobs.c.kind, jobs.c.status)
                )
            }
            oldest = c.execute(select(func.min(jobs.c.created_at)).where(jobs.c.status == "queued")).scalar()
            depth = c.execute(
                select(func.count()).select_from(webhook_outbox).where(webhook_outbox.c.status == "pending")
            ).scalar_one()
            return counts, oldest, depth

        return self.db.read(go)

    # -- webhook outbox --------------------------------------------------------------------------------------

    def due_deliveries(self, worker: str, now: float, lease: float, limit: int) -> list[Delivery]:
        """Claim up to ``limit`` deliveries that are due, with a lease (the sender of another replica skips them)."""
        due = and_(
            webhook_outbox.c.status == "pending",
            webhook_outbox.c.next_attempt_at <= now,
            or_(webhook_outbox.c.lease_expires_at.is_(None), webhook_outbox.c.lease_expires_at < now),
        )
        pick = (
            select(webhook_outbox.c.id)
            .where(due)
            .order_by(webhook_outbox.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        statement = (
            update(webhook_outbox)
            .where(webhook_outbox.c.id.in_(pick.scalar_subquery()), due)
            .values(lease_owner=worker, lease_expires_at=now + lease)
            .returning(*webhook_outbox.c)
        )
        with self.db.begin() as conn:
            return [_delivery(r) for r in conn.execute(statement)]

    def enqueue(self, deliveries: Sequence[Delivery]) -> None:
        self.db.write(lambda c: self._record(c, (), deliveries))

    def update_delivery(self, delivery_id: str, **values: Any) -> None:
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
        self.db.write(
            lambda c: c.execute(update(webhook_outbox).where(webhook_outbox.c.id == delivery_id).values(values))
        )

    def disable_endpoint(self, url: str, reason: str, now: float) -> None:
        """Stop sending to ``url``: remember it, and drop what is still pending for it."""

        def go(conn: Connection) -> None:
            if conn.execute(select(webhook_endpoints.c.url).where(webhook_endpoints.c.url == url)).first() is None:
                conn.execute(insert(webhook_endpoints).values(url=url, disabled_at=now, reason=reason))
            conn.execute(
                update(webhook_outbox)
                .where(webhook_outbox.c.url == url, webhook_outbox.c.status == "pending")
                .values(status="disabled", last_error=reason, lease_owner=None, lease_expires_at=None)
            )

        self.db.write(go)

    def endpoint_disabled(self, url: str) -> str | None:
        query = select(webhook_endpoints.c.reason).where(webhook_endpoints.c.url == url)
        return self.db.read(lambda c: c.execute(query).scalar())

    # -- webhook secrets -------------------------------------------------------------------------------------

    def signing_secrets(self, owner: str, now: float) -> list[str]:
        """The owner's current secret first, then rotated ones still within their grace period."""
        query = (
            select(webhook_secrets.c.secret)
            .where(
                webhook_secrets.c.owner == owner,
                or_(webhook_secrets.c.retired_at.is_(None), webhook_secrets.c.retired_at > now),
            )
            .order_by(webhook_secrets.c.id.desc())
        )
        return self.db.read(lambda c: list(c.execute(query).scalars()))

    def rotate_secret(self, owner: str, secret: str, now: float, grace: float) -> None:
        """Make ``secret`` the owner's current one; the previous stays valid for ``grace`` seconds."""

        def go(conn: Connection) -> None:
            conn.execute(
                update(webhook_secrets)
                .where(webhook_secrets.c.owner == owner, webhook_secrets.c.retired_at.is_(None))
                .values(retired_at=now + grace)
            )
            conn.execute(insert(webhook_secrets).values(owner=owner, secret=secret, created_at=now))

        self.db.write(go)

    def ensure_secret(self, owner: str, secret: str, now: float) -> bool:
        """Store ``secret`` as the owner's unless it has one; True if stored."""

        def go(conn: Connection) -> bool:
            if conn.execute(select(webhook_secrets.c.id).where(webhook_secrets.c.owner == owner).limit(1)).first():
                return False
            conn.execute(insert(webhook_secrets).values(owner=owner, secret=secret, created_at=now))
            return True

        return self.db.write(go)
