"""frozen-code finals: a team's chosen final submission, and each rerun's source

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 20:05:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("is_final", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("rerun_of", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            "fk_submissions_rerun_of_submissions", "submissions", ["rerun_of"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.drop_constraint("fk_submissions_rerun_of_submissions", type_="foreignkey")
        batch_op.drop_column("rerun_of")
        batch_op.drop_column("is_final")
