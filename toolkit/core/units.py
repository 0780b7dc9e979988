"""Byte units, binary as the memory figures of profiles and reports are (1 MiB = 2**20 bytes)."""

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
