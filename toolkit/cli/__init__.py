"""The `bedside` command line: one module per command, `main.py` wires them. Nothing imports this package."""
