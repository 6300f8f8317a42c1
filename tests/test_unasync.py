"""The sync drivers are generated from the async source (scripts/unasync.py): a change to
one side only would let the two paths drift apart, so the suite checks they agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_generated_sync_drivers_match_their_async_source() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "unasync.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_the_generator_turns_the_async_source_into_its_sync_twin() -> None:
    """The rules do what the file relies on: no await left, dropped lines gone."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import unasync
    finally:
        sys.path.pop(0)
    used: set[int] = set()
    generated = unasync.generate("_async/drivers.py", "_sync/drivers.py", used)
    assert "async def" not in generated and "await " not in generated
    assert "unasync: drop" not in generated
    assert "class SyncDrivers(PolicyCore)" in generated
    assert generated == (unasync.PACKAGE / "_sync" / "drivers.py").read_text()
    assert unasync.unasync_text("x = await self._aserve(p, c)  # unasync: drop\n", used) == ""
    assert unasync.unasync_text("await call.agive()\n", used) == "call.give()\n"
