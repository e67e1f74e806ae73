"""python -m harness list: every registered implementation, what it is, and whether it can run here."""

from __future__ import annotations

import argparse
import sys

from harness import registry


def list_implementations() -> str:
    """One line per implementation: name, framework, device, routing, where it comes from, status."""
    rows = [("name", "framework", "device", "routing", "source", "status")]
    for info in registry.entries():
        status = info.availability()
        rows.append((info.name, info.framework, info.device, info.routing, info.source,
                     "available" if status else f"unavailable: {status.reason}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    for name, error in registry.plugin_errors().items():
        lines.append(f"entry point {name!r} of group {registry.ENTRY_POINT_GROUP!r} failed to load: {error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness", description="capsbench command line")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the registered implementations and whether each can run here")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(list_implementations())
    return 0


if __name__ == "__main__":
    sys.exit(main())
