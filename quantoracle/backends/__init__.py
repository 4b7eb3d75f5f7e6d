"""HOW: one folder per kernel backend; each has a ``plugin.py`` that only declares."""
