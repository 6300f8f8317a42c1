"""`rag-resilience` command line: demo | serve | record | bench | watch. Subcommands load lazily."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib import import_module

_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("rag_resilience.demo", "run the RAG demo against the embedded chaos server"),
    "serve": ("rag_resilience.chaos.cli", "run the fault-injecting OpenAI-compatible server"),
    "chaos": ("rag_resilience.chaos.cli", "alias of serve"),
    "record": ("rag_resilience.chaos.record", "re-record the HTTP cassettes"),
    "bench": ("rag_resilience.bench", "run the chaos benchmark"),
    "watch": ("rag_resilience.watch", "live view of circuits and limits (Redis or a stats URL)"),
}


def _usage() -> str:
    lines = ["usage: rag-resilience <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in _COMMANDS:
        print(f"rag-resilience: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = import_module(_COMMANDS[command][0])
    entry: Callable[[list[str]], int | None] = module.main
    return int(entry(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
