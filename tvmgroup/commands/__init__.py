"""Subcommands of the ``tvmgroup`` CLI, one module each."""
