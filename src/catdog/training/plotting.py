"""Matplotlib for the PNG files catdog writes (evaluation plots, sample grids, reliability diagrams, ...)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence


def headless_pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend, unless the program already imported pyplot and so chose a
    backend itself: in a notebook that is the inline backend, and switching it to Agg would stop the notebook's own
    figures from showing after the first catdog call that draws (the Python API's walkthrough tests this)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_photo_grid(photos: Sequence[tuple[str | Path, str]], path: Path, title: str, empty_text: str,
                    tile: int = 160) -> None:
    """A PNG grid of photos (up to 6 a row), each titled with its caption; an unreadable photo is drawn as a note,
    an empty list as `empty_text`. Written atomically."""
    from catdog.runtime.files import write_with_atomic
    from catdog.runtime.images import ImageLoadError, load_image

    plt = headless_pyplot()
    columns = max(1, min(6, len(photos)))
    rows = max(1, -(-len(photos) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.0, rows * 2.7 + 0.3), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    if not photos:
        axes[0][0].text(0.5, 0.5, empty_text, ha="center", va="center")
    for axis, (photo_path, caption) in zip(axes.flat, photos):
        try:
            picture = load_image(photo_path, draft_size=tile)
            picture.thumbnail((tile, tile))
            axis.imshow(picture)
        except ImageLoadError:
            axis.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
        axis.set_title(caption, fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    write_with_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    plt.close(figure)
