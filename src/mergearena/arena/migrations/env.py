"""Alembic environment: runs on the connection that ``arena.db.migrate`` passes in."""

from alembic import context

from mergearena.arena.db import VERSION_TABLE, Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters tables by copying them
    version_table=VERSION_TABLE,
)
with context.begin_transaction():
    context.run_migrations()
