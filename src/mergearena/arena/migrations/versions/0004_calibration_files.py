"""calibration files: examples every job of a competition sees, never scored

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 20:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "calibration_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("competition_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("examples", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["competition_id"], ["competitions.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("competition_id", "name"),
    )
    op.create_index("ix_calibration_files_competition_id", "calibration_files", ["competition_id"])


def downgrade() -> None:
    op.drop_index("ix_calibration_files_competition_id", table_name="calibration_files")
    op.drop_table("calibration_files")
