"""Validation: evaluate an artifact on its runtime against the reference, pass/fail checks, re-plan."""
