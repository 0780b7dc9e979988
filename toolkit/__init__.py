"""Bedside: compress a medical LM or VLM so that it provably fits and works on a target device."""

__version__ = "0.1.0"
