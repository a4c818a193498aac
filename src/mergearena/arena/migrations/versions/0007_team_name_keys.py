"""team names unique under Unicode case folding: a folded key column with a unique index

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 23:55:00

Existing names are folded here. Two that fold alike ("Équipe" and "ÉQUIPE", registered when
only ``lower()`` compared them) refuse the upgrade, naming both: which team keeps its name is the
organizer's call, not the migration's. The check runs before any change, so a refused upgrade
leaves the database as it was (SQLite through pysqlite does not roll back DDL).
"""

import sqlalchemy as sa
from alembic import op

from mergearena.arena.db import NAME_KEY_LENGTH, fold_name
from mergearena.errors import ArenaError

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _folded_keys(teams: list[tuple[int, str]]) -> dict[int, str]:
    """Each team's folded name; refuses the upgrade if two teams' names fold alike."""
    keys = {team_id: fold_name(name) for team_id, name in teams}
    names = dict(teams)
    by_key: dict[str, list[int]] = {}
    for team_id, key in keys.items():
        by_key.setdefault(key, []).append(team_id)
    clashes = [ids for ids in by_key.values() if len(ids) > 1]
    if clashes:
        listed = "; ".join(" and ".join(f"{names[i]!r} (id {i})" for i in ids) for ids in clashes)
        raise ArenaError(
            "cannot upgrade the arena database to revision 0007: team names must now differ by "
            f"more than letter case and Unicode form, and these do not: {listed}. Rename all but "
            "one of each (UPDATE teams SET name = '...' WHERE id = ...), then start again"
        )
    return keys


def upgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.text("SELECT id, name FROM teams ORDER BY id"))
    teams = [(row.id, row.name) for row in rows]
    keys = _folded_keys(teams)
    # A plain ADD COLUMN (SQLite would otherwise copy the table, which its foreign keys forbid);
    # the empty default only fills the column before the keys are written.
    op.add_column(
        "teams",
        sa.Column("name_key", sa.String(length=NAME_KEY_LENGTH), nullable=False, server_default=""),
    )
    for team_id, key in keys.items():
        connection.execute(
            sa.text("UPDATE teams SET name_key = :key WHERE id = :id"), {"key": key, "id": team_id}
        )
    op.create_index("ix_teams_name_key", "teams", ["name_key"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_teams_name_key", table_name="teams")
    op.drop_column("teams", "name_key")  # native on SQLite 3.35+, no copy of the table
