"""Database access: models, engine and session set-up, migrations."""
