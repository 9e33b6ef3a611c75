"""The rsa-pl application: one module per pipeline stage and the Typer app (cli.py)."""
