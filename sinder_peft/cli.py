"""The `sinder` command: `sinder diagnose`, `sinder repair`, `sinder convert`, `sinder evaluate`.

Each subcommand lives with the code it drives (`jobs/diagnose.py`, `jobs/repair.py`, `models/conversion.py`,
`evaluation/evaluate.py`), which
registers its arguments through `add_parser(subparsers)` and its handler through `set_defaults(handler=...)`.
"""

from __future__ import annotations

import argparse
import logging

from .evaluation.evaluate import add_parser as add_evaluate_parser
from .jobs.diagnose import add_parser as add_diagnose_parser
from .jobs.repair import add_parser as add_repair_parser
from .models.conversion import add_parser as add_convert_parser
from .version import __version__


def build_parser() -> argparse.ArgumentParser:
    """Return the `sinder` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="sinder", description="Find and repair the singular defects of Vision Transformers (SINDER, ECCV 2024)."
    )
    parser.add_argument("--version", action="version", version=f"sinder-peft {__version__}")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_diagnose_parser(subparsers)
    add_repair_parser(subparsers)
    add_convert_parser(subparsers)
    add_evaluate_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the command line), run the chosen subcommand and return its exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
