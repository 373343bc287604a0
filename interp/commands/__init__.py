"""CLI verbs; see :mod:`interp.cli`."""
