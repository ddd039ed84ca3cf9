"""gateway.directory.generation.AnswerCache: one generation read serves the refreshes that follow it until
the callbacks made ready before it have run; anything that happened after it is read again."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.directory.generation import AnswerCache
from gateway.storage.db import Database


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[tuple[Database, Path]]:
    path = tmp_path / "test.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.migrate()
    yield db, path
    await db.dispose()


def _bump(path: Path) -> None:
    """A directory change as another writer commits it (the generation trigger's effect)."""
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO directory_generation (id, value) VALUES (1, 1) "
                     "ON CONFLICT (id) DO UPDATE SET value = value + 1")


async def test_refreshes_of_one_stretch_share_a_read_and_the_next_reads_again(sqlite_db: tuple[Database, Path]) -> None:
    db, _path = sqlite_db
    answers = AnswerCache(db)
    await answers.refresh()
    await answers.refresh()
    assert answers.reads == 1
    await asyncio.sleep(0)                                          # the callbacks ready at the read have run
    await answers.refresh()
    assert answers.reads == 2
    await asyncio.gather(answers.refresh(), answers.refresh())     # tasks made ready after that read: read again
    assert answers.reads == 3


async def test_a_change_committed_after_the_read_is_seen_by_the_next_refresh(sqlite_db: tuple[Database, Path]) -> None:
    db, path = sqlite_db
    answers = AnswerCache(db)
    await answers.refresh()
    before = answers.generation
    answers._answers["route", "a@example.test"] = "kept"
    await asyncio.to_thread(_bump, path)            # completes after the read: its waiter is queued after it
    await answers.refresh()
    assert answers.generation != before
    assert ("route", "a@example.test") not in answers._answers


async def test_woken_together_after_a_change_they_all_see_it(sqlite_db: tuple[Database, Path]) -> None:
    db, path = sqlite_db
    answers = AnswerCache(db)
    await answers.refresh()
    changed = asyncio.Event()
    seen: list[int | None] = []

    async def waiter() -> None:
        await changed.wait()
        await answers.refresh()
        seen.append(answers.generation)

    tasks = [asyncio.create_task(waiter()) for _ in range(5)]
    await asyncio.sleep(0)
    await asyncio.to_thread(_bump, path)
    changed.set()
    await asyncio.gather(*tasks)
    generation = await asyncio.to_thread(lambda: sqlite3.connect(path).execute(
        "SELECT value FROM directory_generation WHERE id = 1").fetchone()[0])
    assert seen == [generation] * 5
    assert answers.reads == 2                       # the five woken together shared one read
