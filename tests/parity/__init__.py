"""Parity with the reference implementation: fixtures, their generator and the tests (see README.md)."""
