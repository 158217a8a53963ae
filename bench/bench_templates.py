"""
The dispatcher's message step: drafts per second through project templates and the
built-in defaults, against the floor of the previous template composer (the block's
parts restated, no template engine).

Run: ``.venv/bin/python bench/bench_templates.py`` (``--quick`` for a smoke run).

A burst's batches as the dispatcher composes them (500 drafts, 20 projects, mixed check
types and sources, half the projects with a template of their own), over a real SQLite
store; templates are read once per project (the cache's TTL outlives the run), so the
figure is the rendering cost. Best of several passes, since the machine is shared.
"""

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from delivery.dispatcher.compose import event_block, schedule_block, wakeup_block
from delivery.dispatcher.composers import TemplateComposer
from delivery.dispatcher.messages import Messages, TemplateBooks
from delivery.dispatcher.process import compose_all
from delivery.domain import Draft, IntentBlock, InventoryItem
from delivery.store.engine import create_engine
from delivery.store.keys import KeyStore
from delivery.store.migrate import migrate
from delivery.store.templates import TemplateStore

BATCH = 500
PROJECTS = 20
AT = datetime(2026, 5, 2, 1, tzinfo=UTC)
ITEM = InventoryItem("Ibuprofen", {"dosage": "500mg", "frequency": "twice daily"})


def block(n: int) -> IntentBlock:
    kind = n % 4
    if kind == 0:
        return schedule_block(
            intent="Remind the user to take their ibuprofen at the correct dose",
            check_type="medication",
            fire_at_local="2026-05-02T09:00:00+08:00",
            item=ITEM,
            metadata={"campaign": "v2", "n": n},
        )
    if kind == 1:
        return schedule_block(
            intent="check in on how the user is feeling",
            check_type="check_in",
            fire_at_local="2026-05-02T21:00:00-04:00",
            item=None,
            metadata=None,
        )
    if kind == 2:
        return wakeup_block(
            intent="wish them well",
            check_type="birthday",
            fire_at=AT,
            occasion="Sarah's 30th birthday",
            interest_topic=None,
            event_description=None,
        )
    return event_block(
        event_type="level_up",
        event_description=f"The user just reached level {n % 90}",
        occurred_at=AT,
        metadata={"level": n % 90},
    )


def drafts(project_ids: list[str]) -> list[Draft]:
    return [
        Draft(
            source_id=f"src_{n}",
            project_id=project_ids[n % len(project_ids)],
            agent_id="agent_1",
            user_id=f"user_{n}",
            fire_at=AT,
            block=block(n),
            metadata={},
        )
        for n in range(BATCH)
    ]


async def best_rate(label: str, run: object, passes: int, batches: int) -> float:
    best = 0.0
    for _ in range(passes):
        start = time.perf_counter()
        for _ in range(batches):
            await run()  # type: ignore[operator]
        rate = batches * BATCH / (time.perf_counter() - start)
        best = max(best, rate)
    print(f"{label}: {best:,.0f} messages/s (best of {passes})")
    return best


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few batches")
    args = parser.parse_args()
    passes, batches = (2, 4) if args.quick else (5, 20)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        await migrate(url)
        engine = create_engine(url)
        try:
            keys, store = KeyStore(engine), TemplateStore(engine)
            project_ids = []
            for p in range(PROJECTS):
                project = await keys.ensure_project(f"p{p}", AT)
                project_ids.append(project.id)
                if p % 2 == 0:
                    await store.create_template(
                        project.id,
                        check_type="medication",
                        source="schedule",
                        body="Good {{ time_of_day }}! Time for your {{ item.summary }}.",
                        now=AT,
                    )
                    await store.create_template(
                        project.id,
                        check_type="*",
                        source="event",
                        body="Woohoo! {{ intent_for_user }} ({{ metadata.level }})",
                        now=AT,
                    )
            batch = drafts(project_ids)
            books = TemplateBooks(store, ttl_s=3600)
            messages = Messages(books)
            floor = TemplateComposer()
            sample = await messages.compose(batch[:8])
            for m in sample[:4]:
                print(f"  {m.composer.value:>8}: {m.text}")

            async def ours() -> None:
                await messages.compose(batch)

            async def previous() -> None:
                await compose_all(floor, batch)

            mine = await best_rate("templates and defaults (ours)", ours, passes, batches)
            base = await best_rate("previous composer (floor)", previous, passes, batches)
            print(f"ratio ours/floor: {mine / base:.2f}; template store reads: {books.reads}")
        finally:
            await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
