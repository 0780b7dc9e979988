"""The floor of the house: errors, paths, units, atomic writes, hashes, quality metrics, memory
readings, the format table, record names, token windows.

Imports nothing else of the project (tests/test_architecture.py holds the rule), so every room,
`exporters/` and `runtimes/` included, can build on it.
"""
