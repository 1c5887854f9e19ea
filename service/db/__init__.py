"""Durable state in a relational database (SQLAlchemy 2 + Alembic).

SQLite file as the embedded default (``GENCLIP_DATABASE_URL=sqlite:///./genclip.db``),
PostgreSQL in deployments (``postgresql://user@host/db``). Redis only ever holds transient jobs.

* :mod:`service.db.engine` - engine and session factory from a URL (SQLite pragmas, pooling)
* :mod:`service.db.base` - the declarative base and the column types shared by the tables
* :mod:`service.db.products` - products, their good photos and reference banks
* :mod:`service.db.inspections` - inspection records (one per ``/inspect`` answer) and their reviews
* :mod:`service.db.migrate` - Alembic migrations applied at start-up or by ``genclip db upgrade``
"""
