"""The arena's tables (SQLAlchemy 2), the engine for a database URL, and schema migration.

SQLite (a file, WAL mode) is the default; PostgreSQL works by URL. The schema is created and
upgraded by Alembic (``arena/migrations``); ``open_database`` runs the upgrade, so a new database
file and an old one both come out current.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

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


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    is_baseline: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


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


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    # WAL lets the web server read while a worker writes; busy_timeout makes writers queue up
    # instead of failing at once when several workers claim jobs together.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


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


def open_database(url: str) -> sessionmaker:
    """An engine for ``url`` with the schema migrated, as a session factory."""
    engine = make_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)
