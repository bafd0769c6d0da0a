"""Units of work: the only place the service commits.

The HTTP request, the CLI command and the background job each open one transaction here and
hand its session to domain code, which never commits.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    async with session_factory(engine)() as session, session.begin():
        yield session


# One statement object per SQL string, for statements run on every install: SQLAlchemy then
# parses and keys each only once.
statement = functools.cache(text)
