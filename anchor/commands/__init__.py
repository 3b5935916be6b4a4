"""Subcommands of the ``anchor`` CLI, one module each, registered by :mod:`anchor.cli`."""
