"""The `freevlm` command. Each subcommand lives with the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# modules that define `register(subparsers)`; each adds its own subcommands
COMMAND_MODULES = (
    "freevlm.commands.generate",
    "freevlm.commands.evaluate",
    "freevlm.commands.train",
    "freevlm.commands.demo",
    "freevlm.commands.calibrate",
)


class UserError(Exception):
    """A problem with what the user gave us: printed as one line, exit code 2, no stack trace.

    ValueError, TypeError and FileNotFoundError raised by the library's own input checks are shown the same way;
    set FREEVLM_DEBUG=1 to see the traceback instead."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="freevlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (UserError, FileNotFoundError, ValueError, TypeError) as err:
        if os.environ.get("FREEVLM_DEBUG"):
            raise
        print(f"freevlm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # `python -m freevlm.cli`: run the package's copy, whose UserError the commands raise
    from freevlm.cli import main as package_main

    sys.exit(package_main())
