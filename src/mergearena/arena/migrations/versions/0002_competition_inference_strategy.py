"""competition inference strategy: few-shot count and chain-of-thought settings

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:04:51.203117
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Both nullable: an existing competition keeps each task's own settings, as it did.
    with op.batch_alter_table("competitions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fewshot", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("cot", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("competitions", schema=None) as batch_op:
        batch_op.drop_column("cot")
        batch_op.drop_column("fewshot")
