"""Leaving listed photos out of training: `catdog train --exclude FILE`.

The list is a label_issues.csv from `catdog data issues` (its flagged rows) or a plain list of paths, one per line
(like `data audit`'s quarantine.txt). Pure Python on top of `catdog.runtime.data`, so the train command and
`label_issues` both import it without importing each other.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from catdog.runtime.data import DataError, LabelledImages


def read_exclusion_list(path: str | Path) -> list[str]:
    """The paths a list file names: a CSV with a `path` column (a label_issues.csv: only its flagged rows, where
    `label_issue` is 1; any other CSV: every row), or a plain list, one path per line, anything after a tab
    ignored (`data audit`'s quarantine.txt), blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such exclusion list")
    text = path.read_text(encoding="utf-8-sig")
    first_line = text.split("\n", 1)[0]
    if path.suffix.lower() == ".csv" or first_line.split(",")[0].strip() == "path":
        reader = csv.DictReader(text.splitlines())
        if "path" not in (reader.fieldnames or []):
            raise DataError(f"{path}: a CSV exclusion list needs a path column; found {reader.fieldnames}")
        rows = list(reader)
        if "label_issue" in (reader.fieldnames or []):
            rows = [row for row in rows if (row["label_issue"] or "").strip().lower() in ("1", "true", "yes")]
        return [row["path"].strip() for row in rows if (row["path"] or "").strip()]
    lines = (line.split("\t", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def exclude_listed(images: LabelledImages, list_file: str | Path) -> tuple[LabelledImages, list[Path], list[str]]:
    """`images` without the photos `list_file` names, the photos left out, and the listed paths that match no
    photo. A listed path matches a photo by its path relative to the data set's root (as label_issues.csv and
    split.json write it) or as a file path (absolute, or relative to the current folder or the list's folder)."""

    def normalised(path) -> str:
        return os.path.normpath(os.path.abspath(path))

    listed = read_exclusion_list(list_file)
    list_folder = Path(list_file).parent
    wanted: dict[str, str] = {}
    for entry in listed:
        for key in (entry, normalised(entry), normalised(list_folder / entry)):
            wanted.setdefault(key, entry)
    matched_entries: set[str] = set()
    keep, dropped = [], []
    for index, (path, relative) in enumerate(zip(images.paths, images.relative_paths())):
        hit = next((wanted[key] for key in (relative, normalised(path)) if key in wanted), None)
        if hit is None:
            keep.append(index)
        else:
            matched_entries.add(hit)
            dropped.append(path)
    kept = images.subset(keep)
    lost = sorted(set(images.class_names) - {kept.class_names[label] for label in kept.labels})
    if lost:
        raise DataError(f"{list_file}: it excludes every image of class(es) {lost}")
    return kept, dropped, [entry for entry in listed if entry not in matched_entries]
