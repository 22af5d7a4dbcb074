"""Subcommands of the `freevlm` CLI, one module per area."""
