"""The ``anchor`` command line: one subcommand per module in :mod:`anchor.commands`.

Each command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a function
taking the parsed ``argparse.Namespace``. Heavy imports (torch, transformers) happen inside those functions, so
``anchor --help`` stays fast. Options shared by commands live in :mod:`anchor.commands.options`. Errors that a user
can fix print as one line (:data:`USER_ERRORS`), Ctrl-C as ``interrupted.`` with exit status 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("axis", "data", "train", "calibrate", "monitor", "chat", "generate", "eval", "import_axis", "export",
            "screen")


USER_ERRORS = (ValueError, OSError, RuntimeError, ImportError)
"""What a bad input, file, model name or environment raises; printed as one line (``ANCHOR_DEBUG=1``: traceback).
``OSError`` covers missing and unwritable paths, existing outputs and the model hub's errors."""


def build_parser() -> argparse.ArgumentParser:
    from anchor import __version__

    parser = argparse.ArgumentParser(prog="anchor", description="Persona anchoring for chat models.")
    parser.add_argument("--version", action="version", version=f"anchor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"anchor.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\nanchor {args.command}: interrupted.", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if os.environ.get("ANCHOR_DEBUG"):
            raise
        # Our errors say what to fix; a traceback would bury that.
        print(f"anchor {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
