"""Subcommands of the ``saeforge`` CLI, one module each, discovered automatically by ``saeforge.cli``."""
