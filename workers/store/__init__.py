"""Postgres storage: models, migrations, and one module per table's writes and reads."""
