"""The `freevlm` command. Each subcommand lives with the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError

# modules that define `register(subparsers)`; each adds its own subcommands
COMMAND_MODULES = (
    "freevlm.commands.generate",
    "freevlm.commands.evaluate",
    "freevlm.commands.train",
    "freevlm.commands.demo",
    "freevlm.commands.calibrate",
    "freevlm.commands.serve",
)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A `UserError` (a missing file, a refused option) or a `ValueError` (the library's checks
    of its arguments and inputs) is printed as one line with exit code 2; any other exception is a bug and keeps its
    traceback. FREEVLM_DEBUG=1 shows the traceback of those two as well."""
    parser = argparse.ArgumentParser(prog="freevlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (UserError, ValueError) as err:
        if os.environ.get("FREEVLM_DEBUG"):
            raise
        print(f"freevlm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
