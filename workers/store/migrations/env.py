"""Alembic environment: migrates the database ``DATABASE_URL`` names (or the URL passed in)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from workers.store.models import metadata

config = context.config


def run_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        from workers import settings
        from workers.store.db import sqlalchemy_url

        url = sqlalchemy_url(settings.core().database_url)
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()


run_migrations()
