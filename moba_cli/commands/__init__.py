"""Thin Typer commands: parse, validate, call the library, write results."""
