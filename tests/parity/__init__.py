"""Parity tests: the bundle against golden values of the reference (`fixtures/*.npz`, made by
`make_fixtures.py`); the tests need neither the reference code nor network access."""
