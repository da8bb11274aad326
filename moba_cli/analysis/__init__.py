"""Analyses behind the commands (their logic, kept out of the Typer functions)."""
