"""The database's address in the form SQLAlchemy's psycopg2 dialect takes."""

from __future__ import annotations


def sqlalchemy_url(url: str) -> str:
    """A SQLAlchemy URL for psycopg2, whichever spelling of Postgres URL was configured."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url
