"""``saeforge`` command line. Every module in ``saeforge/commands`` defines ``register(subparsers)``;
each subcommand sets ``func``. A :class:`SaeforgeError` prints as one line on stderr and exits 2."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from saeforge.errors import SaeforgeError


def build_parser() -> argparse.ArgumentParser:
    from saeforge import commands

    parser = argparse.ArgumentParser(
        prog="saeforge",
        description="Sparse autoencoders on language-model activations: harvest activations, train SAEs, "
        "evaluate them, adapt the model around them, browse their features, convert formats.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"saeforge.commands.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from saeforge.kernels.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # large CPU buffers stay in the heap between steps (same numbers; see its docstring)
    try:
        rc = args.func(args)
    except SaeforgeError as err:
        print(f"saeforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saeforge {args.command}: interrupted; rerun with --resume where supported", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
