"""The ``ngkit`` command line (Typer + rich)."""
