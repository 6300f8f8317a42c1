"""Generate the sync drivers from the async source, httpcore's way: the async code is
written once and the sync twin is a text transformation of it, at zero runtime cost.

    python scripts/unasync.py          # write src/rag_resilience/_sync/*.py
    python scripts/unasync.py --check  # exit 1 if a generated file is out of date

Rules, applied line by line: the substitutions in SUBS (whole words), then lines that
end with `# unasync: drop` are left out (what only the async side does, e.g. cancel an
attempt at its timeout). The output's imports are sorted and it is formatted with ruff, as the rest of src/.
Every substitution must be used at least once, so a stale rule is noticed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "rag_resilience"
FILES = [("_async/drivers.py", "_sync/drivers.py")]
DROP = "# unasync: drop"
HEADER = (
    "# Generated from src/rag_resilience/{src} by scripts/unasync.py: do not edit.\n"
    "# Change the async source and run `python scripts/unasync.py`.\n"
)

SUBS: list[tuple[str, str]] = [
    # the language
    (r"async def ", "def "),
    (r"async for ", "for "),
    (r"await_\(", "wait("),  # RateLimiter.await_ -> RateLimiter.wait
    (r"await_recovery", "wait_recovery"),
    (r"await ", ""),
    (r"StopAsyncIteration", "StopIteration"),
    (r"AsyncIterator", "Iterator"),
    (r"Awaitable\[T\]", "T"),
    (r"Awaitable, ", ""),
    (r"__aiter__", "__iter__"),
    (r"AsyncStreamSource", "StreamSource"),
    (r"AsyncDrivers", "SyncDrivers"),
    # what is cancelled at a timeout on the async side only
    (r"run_with_timeout\(([^,]+), timeout\)", r"\1"),
    (r"astream_of\((.+), timeout\)", r"\1"),
    (r"iterator\.__anext__\(\)", "iterator.__next__()"),
    (r"timeout = run\.start_attempt\(\)", "run.start_attempt()"),
    # our own twins: `aname` / `_aname` -> `name` / `_name`
    (r"aexecute", "execute"),
    (r"_adegrade", "_degrade"),
    (r"_aserve", "_serve"),
    (r"_arefused", "_refused"),
    (r"_apause", "_pause"),
    (r"_apublished", "_published"),
    (r"_astore", "_store"),
    (r"_alookup", "_lookup"),
    (r"aadmit", "admit"),
    (r"aon_(success|failure|abandon)", r"on_\1"),
    (r"aacquire", "acquire"),
    (r"arelease", "release"),
    (r"atake", "take"),
    (r"agive", "give"),
    (r"asleep", "sleep"),
    (r"aclose_upstream", "close_upstream"),
    (r"aupdate_cache", "update_cache"),
    (r"aget_last_known_good", "get_last_known_good"),
    (r"asettle", "settle"),
    (r"aiter_items", "iter_items"),
]
_COMPILED = [(re.compile(r"\b" + pattern), repl) for pattern, repl in SUBS]


def unasync_text(text: str, used: set[int]) -> str:
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.rstrip().endswith(DROP):
            continue
        for index, (regex, repl) in enumerate(_COMPILED):
            line, n = regex.subn(repl, line)
            if n:
                used.add(index)
        out.append(line)
    return "".join(out)


def _ruff(text: str, name: str, *args: str) -> str:
    ruff = Path(sys.executable).with_name("ruff")
    command = [str(ruff)] if ruff.exists() else [sys.executable, "-m", "ruff"]
    done = subprocess.run(
        [*command, *args, "--stdin-filename", name, "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"ruff {args[0]} failed on the generated {name}:\n{done.stderr}")
    return done.stdout


def _tidy(text: str, name: str) -> str:
    """Sort the imports (a renamed name may move) and format, as for the rest of src/."""
    text = _ruff(text, name, "check", "--select", "I", "--fix", "--exit-zero", "--quiet")
    return _ruff(text, name, "format")


def generate(src: str, dst: str, used: set[int]) -> str:
    text = (PACKAGE / src).read_text()
    return _tidy(HEADER.format(src=src) + unasync_text(text, used), str(PACKAGE / dst))


def main(argv: list[str]) -> int:
    check = "--check" in argv
    used: set[int] = set()
    stale: list[str] = []
    for src, dst in FILES:
        expected = generate(src, dst, used)
        target = PACKAGE / dst
        if check:
            if not target.exists() or target.read_text() != expected:
                stale.append(dst)
        else:
            target.write_text(expected)
    unused = [SUBS[i] for i in range(len(SUBS)) if i not in used]
    if unused:
        print(f"unasync: substitutions never used (remove them): {unused}", file=sys.stderr)
        return 1
    if stale:
        print(
            f"unasync: {', '.join(stale)} out of date; run `python scripts/unasync.py`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
