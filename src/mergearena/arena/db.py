"""The arena's tables (SQLAlchemy 2), the engine for a database URL, and schema migration.

SQLite (a file, WAL mode) is the default; PostgreSQL works by URL. The schema is created and
upgraded by Alembic (``arena/migrations``); ``open_database`` runs the upgrade, so a new database
file and an old one both come out current.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
    validates,
)

PHASE_KINDS = ("validation", "public_test", "final")
SUBMISSION_KINDS = ("recipe", "code", "routed")
STATUSES = ("queued", "running", "scored", "failed", "timed_out")
BOARD_MODES = ("best", "latest")
TRACKS = ("performance", "efficiency", "creative")  # the competition's three prize tracks


def utcnow() -> dt.datetime:
    """Naive UTC: stored the same way by SQLite and PostgreSQL ``timestamp`` columns."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class Competition(Base):
    __tablename__ = "competitions"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    rules: Mapped[str] = mapped_column(Text, default="")
    allowed_models: Mapped[list[str]] = mapped_column(default=list)
    max_parameters: Mapped[int | None] = mapped_column(BigInteger)
    time_limit_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    memory_limit_bytes: Mapped[int | None] = mapped_column(BigInteger)
    daily_submissions: Mapped[int] = mapped_column(Integer, default=1)
    mc_rule: Mapped[str] = mapped_column(String(32), default="loglik")
    fewshot: Mapped[int | None] = mapped_column(Integer)  # None: each task's own examples
    cot: Mapped[dict[str, Any] | None] = mapped_column()  # CotSettings keys over each task's
    board_mode: Mapped[str] = mapped_column(String(16), default="best")
    allow_unsandboxed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    phases: Mapped[list[Phase]] = relationship(
        back_populates="competition", order_by="Phase.id", cascade="all, delete-orphan"
    )
    calibration: Mapped[list[CalibrationFile]] = relationship(
        order_by="CalibrationFile.name", cascade="all, delete-orphan"
    )


class CalibrationFile(Base):
    """A file of examples the organizer gives every job of a competition, read-only, for
    data-aware merges and routers (the competition allowed calibration data); never scored."""

    __tablename__ = "calibration_files"
    __table_args__ = (UniqueConstraint("competition_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    competition_id: Mapped[int] = mapped_column(ForeignKey("competitions.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))  # the file is <name>.csv in the job
    sha256: Mapped[str] = mapped_column(String(64))
    examples: Mapped[int] = mapped_column(Integer)


class Phase(Base):
    __tablename__ = "phases"
    __table_args__ = (UniqueConstraint("competition_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    competition_id: Mapped[int] = mapped_column(ForeignKey("competitions.id"))
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # one of PHASE_KINDS
    closed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    competition: Mapped[Competition] = relationship(back_populates="phases")
    tasks: Mapped[list[PhaseTask]] = relationship(
        back_populates="phase", order_by="PhaseTask.name", cascade="all, delete-orphan"
    )

    @property
    def scores_visible(self) -> bool:
        """Validation and public test show scores; the final phase only once it is closed."""
        return self.kind != "final" or self.closed

    @property
    def accepts_submissions(self) -> bool:
        return not self.closed


class PhaseTask(Base):
    """A task file of a phase, stored twice: inputs (what submissions see) and the full file."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("phase_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    phase_id: Mapped[int] = mapped_column(ForeignKey("phases.id"))
    name: Mapped[str] = mapped_column(String(64))
    inputs_sha256: Mapped[str] = mapped_column(String(64))
    full_sha256: Mapped[str] = mapped_column(String(64))  # with targets: never leaves the service
    sidecar: Mapped[str | None] = mapped_column(Text)  # the task's JSON settings, if any
    examples: Mapped[int] = mapped_column(Integer)
    main_metric: Mapped[str] = mapped_column(String(32))
    targets_public: Mapped[bool] = mapped_column(Boolean, default=False)

    phase: Mapped[Phase] = relationship(back_populates="tasks")


NAME_KEY_LENGTH = 400  # a 100-character name can grow under NFKC and case folding


def fold_name(name: str) -> str:
    """A team name as compared for uniqueness: Unicode compatibility-normalized (NFKC) and
    case-folded, so "ÉQUIPE", "équipe", "Straße"/"STRASSE" and full-width letters collide
    (``lower()`` in SQL folds ASCII only on SQLite, and neither database folds "ß" or "ｅ")."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return " ".join(folded.split())


class Team(Base):
    __tablename__ = "teams"
    # The unique key that makes two names the same team name, under concurrent registrations too.
    __table_args__ = (Index("ix_teams_name_key", "name_key", unique=True),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    name_key: Mapped[str] = mapped_column(String(NAME_KEY_LENGTH))  # fold_name(name), kept by _fold
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    # Set only by the service for the organizer's baselines (never from a registration): the
    # baseline team is found by this flag, not by its name.
    is_baseline: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    @validates("name")
    def _fold(self, _key: str, name: str) -> str:
        self.name_key = fold_name(name)
        return name


class Submission(Base):
    __tablename__ = "submissions"

    id: Mapped[int] = mapped_column(primary_key=True)
    phase_id: Mapped[int] = mapped_column(ForeignKey("phases.id"), index=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # one of SUBMISSION_KINDS
    file_name: Mapped[str] = mapped_column(String(255))
    file_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    average: Mapped[float | None] = mapped_column(Float)
    scores: Mapped[dict[str, Any] | None] = mapped_column()
    costs: Mapped[dict[str, Any] | None] = mapped_column()  # what the run cost (worker._costs)
    log: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    disqualified: Mapped[bool] = mapped_column(Boolean, default=False)
    # The finals: the team's chosen submission, and a final-phase rerun's source submission.
    is_final: Mapped[bool] = mapped_column(Boolean, default=False)
    rerun_of: Mapped[int | None] = mapped_column(ForeignKey("submissions.id"))

    phase: Mapped[Phase] = relationship()
    team: Mapped[Team] = relationship()
    writeup: Mapped[Writeup | None] = relationship(back_populates="submission")


class Writeup(Base):
    """A team's write-up of a submission (Markdown or PDF, ``arena/writeups.py``), stored as a
    blob; public once the submission wins a track, else for its team and the organizer."""

    __tablename__ = "writeups"

    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"), unique=True)
    format: Mapped[str] = mapped_column(String(16))  # one of writeups.FORMATS
    file_name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    title: Mapped[str | None] = mapped_column(String(200))  # a Markdown write-up's first heading
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    submission: Mapped[Submission] = relationship(back_populates="writeup")


class Award(Base):
    """A winner the organizer marked: a submission's place in one of a competition's tracks."""

    __tablename__ = "awards"
    __table_args__ = (UniqueConstraint("competition_id", "track", "submission_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    competition_id: Mapped[int] = mapped_column(ForeignKey("competitions.id"), index=True)
    track: Mapped[str] = mapped_column(String(16))  # one of TRACKS
    place: Mapped[int] = mapped_column(Integer, default=1)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    submission: Mapped[Submission] = relationship()


def default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'arena.db').absolute()}"


# How long a statement waits for another transaction's lock before it fails (and the web app
# answers 503 with Retry-After). The web server waits briefly: a request that queues behind
# writers holds a thread and its client. A worker's writes (claim, renew, finish) are rare and
# must not be lost to a burst of uploads, so it may wait longer (``open_database``'s argument).
WEB_LOCK_TIMEOUT_SECONDS = 5.0
WORKER_LOCK_TIMEOUT_SECONDS = 30.0

# An execution option that makes a SQLite transaction start with BEGIN IMMEDIATE (``_begin``).
_IMMEDIATE = "mergearena_sqlite_immediate"


def _sqlite_pragmas(lock_timeout_seconds: float) -> Any:
    def on_connect(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        # WAL lets readers go on while one writer writes; busy_timeout makes a writer queue for
        # the lock for that long instead of failing at once.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(lock_timeout_seconds * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


def _begin(connection: Connection) -> None:
    """Start a SQLite transaction with BEGIN IMMEDIATE where ``lock_for_update`` asked for it.

    Other transactions keep pysqlite's own handling (BEGIN before the first write, reads outside
    a transaction), which never fails a read-then-write request at once with "database is
    locked". A transaction that must read and write as one step takes the write lock first:
    waiting for it (busy_timeout) at BEGIN, not failing at its first write when another writer
    committed since it read.
    """
    if connection.get_execution_options().get(_IMMEDIATE):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, lock_timeout_seconds: float = WEB_LOCK_TIMEOUT_SECONDS) -> Engine:
    """An engine whose statements wait at most ``lock_timeout_seconds`` for a lock."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas(lock_timeout_seconds))
        event.listen(engine, "begin", _begin)
        return engine
    if not url.startswith("postgresql"):
        return create_engine(url, pool_pre_ping=True)
    # PostgreSQL's lock_timeout: a statement waiting that long for a row or table lock fails
    # (SQLSTATE 55P03), as SQLite's busy_timeout does.
    options = f"-c lock_timeout={int(lock_timeout_seconds * 1000)}"
    return create_engine(url, pool_pre_ping=True, connect_args={"options": options})


def lock_for_update(session: Session, row: Any) -> None:
    """Commit what ``session`` holds, then begin a transaction that holds ``row`` locked until
    the session commits or rolls back: two such transactions on one row run one after the other,
    so what the second reads includes what the first wrote (a count, then an insert).

    PostgreSQL locks the row (``SELECT ... FOR UPDATE``): writers of other rows go on. SQLite
    locks the whole database for writing (``BEGIN IMMEDIATE``); keep such transactions short.
    Both wait at most the engine's lock timeout, then raise ``OperationalError``
    (``is_lock_timeout``).
    """
    session.commit()
    if session.get_bind().dialect.name == "sqlite":
        session.connection(execution_options={_IMMEDIATE: True})
        return
    entity = type(row)
    session.execute(select(entity.id).where(entity.id == row.id).with_for_update())


def is_lock_timeout(error: OperationalError) -> bool:
    """The database gave up waiting for a lock another transaction holds (SQLite's "database
    is locked", PostgreSQL's lock timeout, deadlock or serialization failure): worth retrying."""
    sqlstate = getattr(error.orig, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in ("55P03", "40P01", "40001")
    message = str(error.orig).lower()
    return "database is locked" in message or "database is busy" in message


# The arena records its schema revision in a table of its own, not Alembic's default
# ``alembic_version``: other tools keep theirs there (Optuna's studies of `mergearena search
# --storage` live in the arena's database beside it).
VERSION_TABLE = "mergearena_alembic_version"


def _adopt_default_version_table(connection: Any) -> None:
    """A database migrated before ``VERSION_TABLE`` kept the arena's revision in
    ``alembic_version``: move it, so the arena's migrations find it and the table is free."""
    from sqlalchemy import inspect, text

    tables = set(inspect(connection).get_table_names())
    if "alembic_version" not in tables or VERSION_TABLE in tables or "competitions" not in tables:
        return
    revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    connection.execute(
        text(f"CREATE TABLE {VERSION_TABLE} (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
    )
    connection.execute(text(f"INSERT INTO {VERSION_TABLE} VALUES (:r)"), {"r": revision})
    connection.execute(text("DROP TABLE alembic_version"))


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to an Alembic revision, the newest by default (creates it in an empty
    database)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    with engine.begin() as connection:
        _adopt_default_version_table(connection)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def open_database(url: str, lock_timeout_seconds: float = WEB_LOCK_TIMEOUT_SECONDS) -> sessionmaker:
    """An engine for ``url`` with the schema migrated, as a session factory. A worker passes
    ``WORKER_LOCK_TIMEOUT_SECONDS``: its engine is its own, even in the web server's process."""
    engine = make_engine(url, lock_timeout_seconds)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)
