"""Progress bars (tqdm) on standard error, shared by every command that works through many images."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(enabled: bool, total: int, description: str, leave: bool = False) -> tqdm:
    return tqdm(total=total, desc=description, unit="img", disable=not enabled, leave=leave, dynamic_ncols=True,
                file=sys.stderr)
