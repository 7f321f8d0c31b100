"""Matplotlib for the PNG files catdog writes (evaluation plots, sample grids, reliability diagrams, ...)."""

from __future__ import annotations

import sys


def headless_pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend, unless the program already imported pyplot and so chose a
    backend itself: in a notebook that is the inline backend, and switching it to Agg would stop the notebook's own
    figures from showing after the first catdog call that draws (the Python API's walkthrough tests this)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
