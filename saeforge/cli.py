"""``saeforge`` command line. Every module in ``saeforge/commands`` defines ``register(subparsers)``;
each subcommand sets ``func``.

Errors end here, in one place: a :class:`SaeforgeError` or any OS/library error a user can cause (see
:func:`saeforge.errors.describe`) prints as one line on stderr and exits 2; anything else is a bug and prints
one line asking for a report (exit 1). ``--debug`` (or ``SAEFORGE_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from saeforge.errors import describe
from saeforge import commands
from saeforge.kernels.allocator import tune_cpu_allocator


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: the problem and where to read the usage, no usage dump."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help once: not when the help already names its default, nor for
    flags (store_true) and options without a default (None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or \
                isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                                    argparse._VersionAction)) or not (action.option_strings or action.nargs in
                                                                      (argparse.OPTIONAL, argparse.ZERO_OR_MORE)):
            return text
        return text + " (default: %(default)s)"


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`HelpFormatter` that keeps the description and epilog as written (examples)."""


def _one_default_each(parser: argparse.ArgumentParser) -> None:
    """Every (sub)parser shows each default once (see :class:`HelpFormatter`), whatever formatter it asked for."""
    raw = isinstance(parser.formatter_class, type) and issubclass(parser.formatter_class,
                                                                  argparse.RawDescriptionHelpFormatter)
    parser.formatter_class = RawHelpFormatter if raw else HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _one_default_each(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="saeforge",
        description="Sparse autoencoders on language-model activations: harvest activations, train SAEs, "
        "evaluate them, adapt the model around them, browse their features, convert formats.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line summary")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"saeforge.commands.{mod.name}").register(sub)
    _one_default_each(parser)
    return parser


def _debug_wanted(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("SAEFORGE_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_wanted(argv)
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line, not only before COMMAND
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error prints usage + one line and exits 2 (SystemExit)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1

    tune_cpu_allocator()  # large CPU buffers stay in the heap between steps (same numbers; see its docstring)
    name = args.command
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print(f"saeforge {name}: interrupted; rerun with --resume where supported", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place every error becomes one line
        if debug:
            raise
        line = describe(err)
        if line is None:
            first = (str(err).strip().splitlines() or [""])[0]
            print(f"saeforge {name}: internal error: {type(err).__name__}: {first}; rerun with --debug for the "
                  "traceback and report it", file=sys.stderr)
            return 1
        print(f"saeforge {name}: error: {line}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
