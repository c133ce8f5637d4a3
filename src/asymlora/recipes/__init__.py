"""End-to-end programs the CLI calls; each reads top to bottom."""
