"""Data sets on disk: layout detection and the stratified split. Runtime layer (no torch): the PyTorch datasets
are `catdog.training.datasets`.

Supported layouts (detected automatically, overridable with `layout=`):
- `kaggle`: a flat folder of `<class>.<id>.<ext>` files (Kaggle's `train/cat.0.jpg`); a folder holding `train/`
  in that form is accepted too;
- `folders`: one sub-folder per class, searched recursively (torchvision's ImageFolder, Microsoft's
  `PetImages/Cat`, `PetImages/Dog`); a folder whose only child is such a folder (`PetImages/`) is accepted too;
- `csv`: a CSV manifest with columns `path,label`; relative paths are relative to the manifest's folder.

Several sources (`catdog train --data A --data B`: the original data set and photos collected later, say) are each
discovered in their own layout and merged into one set (`merge_sources`): class names matched across sources
(ignoring case, so Kaggle's `cat` and PetImages' `Cat` are one class), byte-identical files kept once (the first
met, in the order the sources were given), and what was dropped reported; one stratified split follows as for one
source.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import stat
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from catdog.runtime.images import has_image_extension

LAYOUTS = ("auto", "kaggle", "folders", "csv")
_KAGGLE_NAME = re.compile(r"^([A-Za-z][A-Za-z_\-]*)\.[^.]+\.[A-Za-z]+$")


class DataError(Exception):
    """A data set that cannot be used as given (missing folder, no images, one class only, bad manifest)."""


@dataclass
class LabelledImages:
    """Image paths with integer labels; `class_names[label]` names each label. `root` is what paths are relative to."""

    root: Path
    paths: list[Path]
    labels: list[int]
    class_names: list[str]
    layout: str
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, why) for files not taken as images

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {name: counts.get(index, 0) for index, name in enumerate(self.class_names)}

    def subset(self, indices: Sequence[int]) -> "LabelledImages":
        return LabelledImages(
            self.root, [self.paths[i] for i in indices], [self.labels[i] for i in indices], self.class_names, self.layout
        )

    def relative_paths(self) -> list[str]:
        return [relative_to_root(path, self.root) for path in self.paths]


def relative_to_root(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def find_image_files(folder: Path, recursive: bool = True) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files under `folder`, sorted, with what was deliberately left out and why.

    Symbolic links are followed wherever they lead: folders of links are normal for local data (a read-only Kaggle
    input linked into a working folder, subsets made with `ln -s`). Broken links and link loops are left out and
    reported, and a folder reached a second time through a link is searched only once (so a link back to a parent
    cannot make the walk endless). Hidden files and folders (`.DS_Store`, `.ipynb_checkpoints`) are skipped; so are
    directories named like images and files without an image extension.
    """
    folder = Path(folder)
    found: list[Path] = []
    ignored: list[tuple[str, str]] = []
    # A link to the folder or to any folder above it would make the walk endless: those count as loops from the start.
    above = {os.path.realpath(path) for path in (folder.absolute(), *folder.absolute().parents)}
    searched = set(above)
    for directory, subdirectories, filenames in os.walk(folder, followlinks=True):
        kept = []
        candidates = sorted(d for d in subdirectories if not d.startswith(".")) if recursive else []
        for subdirectory in candidates:
            path = Path(directory) / subdirectory
            if has_image_extension(subdirectory):
                ignored.append((str(path), "directory named like an image"))
            target = os.path.realpath(path)
            if target in searched:
                loop = target in above or Path(os.path.realpath(directory)).is_relative_to(target)
                ignored.append((str(path), "symbolic link loop" if loop else "folder already searched through another link"))
                continue
            searched.add(target)
            kept.append(subdirectory)
        subdirectories[:] = kept
        for filename in sorted(filenames):
            path = Path(directory) / filename
            if filename.startswith("."):
                ignored.append((str(path), "hidden file"))
                continue
            if not has_image_extension(filename):
                ignored.append((str(path), "not an image file name"))
                continue
            if path.is_symlink():
                problem = broken_link_problem(path)
                if problem:
                    ignored.append((str(path), problem))
                    continue
            found.append(path)
    return found, ignored


def broken_link_problem(path: Path) -> str | None:
    """Why the symbolic link `path` leads to no file ("broken symbolic link", "symbolic link loop"), or None."""
    try:
        target = path.stat()  # follows the whole chain of links
    except OSError as error:
        return "symbolic link loop" if error.errno == errno.ELOOP else "broken symbolic link"
    return None if stat.S_ISREG(target.st_mode) else "symbolic link to something that is not a file"


def describe_left_out(ignored: Sequence[tuple[str, str]]) -> str:
    """'3 files left out: 2 broken symbolic link, 1 symbolic link loop' (empty when nothing was left out)."""
    if not ignored:
        return ""
    reasons = Counter(why for _, why in ignored)
    return f"{len(ignored)} left out: " + ", ".join(f"{count} {why}" for why, count in reasons.most_common())


def discover(root: str | os.PathLike, layout: str = "auto") -> LabelledImages:
    """Find the labelled images under `root` in the given layout ("auto" detects it)."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    if layout == "auto":
        layout, root = detect_layout(root)
    if layout == "csv":
        images = _read_csv_manifest(root)
    elif layout == "kaggle":
        images = _read_kaggle_folder(root)
    else:
        images = _read_class_folders(root)
    if len(images.class_names) < 2:
        raise DataError(f"{root}: found {len(images.class_names)} class(es) {images.class_names}; need at least two")
    empty = [name for name, count in images.class_counts().items() if count == 0]
    if empty:
        left_out = describe_left_out(images.ignored)
        raise DataError(f"{root}: classes without any image: {', '.join(empty)}" + (f"; {left_out}" if left_out else ""))
    return images


def detect_layout(root: Path) -> tuple[str, Path]:
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "csv", root
        raise DataError(f"{root}: a file, but not a CSV manifest (.csv)")
    children = sorted(p for p in root.iterdir() if not is_hidden(p))
    # Broken links count as files here, so that a folder of them is read and its error says what was left out.
    files = [p for p in children if (p.is_file() or p.is_symlink()) and not p.is_dir() and has_image_extension(p.name)]
    folders = [p for p in children if p.is_dir()]
    if files and sum(bool(_KAGGLE_NAME.match(p.name)) for p in files) >= 0.5 * len(files):
        return "kaggle", root
    if not files and len(folders) == 1:
        return detect_layout(folders[0])  # PetImages/ inside a download folder
    if not files and any(p.name == "train" for p in folders):
        train = root / "train"
        train_files = [p for p in train.iterdir() if p.is_file() and has_image_extension(p.name)]
        if train_files and any(_KAGGLE_NAME.match(p.name) for p in train_files):
            return "kaggle", train
        return "folders", train
    if folders:
        return "folders", root
    manifests = [p for p in children if p.suffix.lower() == ".csv"]
    if len(manifests) == 1:
        return "csv", manifests[0]
    raise DataError(
        f"{root}: cannot tell the layout: expected class sub-folders, Kaggle-style names like cat.0.jpg, "
        "or a CSV manifest (path,label)"
    )


def _read_kaggle_folder(root: Path) -> LabelledImages:
    paths, ignored = find_image_files(root, recursive=False)
    labelled: list[tuple[Path, str]] = []
    for path in paths:
        match = _KAGGLE_NAME.match(path.name)
        if match:
            labelled.append((path, match.group(1).lower()))
        else:
            ignored.append((str(path), "name does not follow <class>.<id>.<ext>"))
    return _build(root, labelled, "kaggle", ignored)


def _read_class_folders(root: Path) -> LabelledImages:
    labelled: list[tuple[Path, str]] = []
    ignored: list[tuple[str, str]] = []
    class_folders = sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p))
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        ignored.append((str(path), "file outside the class folders"))
    for class_folder in class_folders:
        paths, skipped = find_image_files(class_folder)
        ignored.extend(skipped)
        labelled.extend((path, class_folder.name) for path in paths)
    return _build(root, labelled, "folders", ignored, keep_empty_classes=[p.name for p in class_folders])


def _read_csv_manifest(manifest: Path) -> LabelledImages:
    labelled: list[tuple[Path, str]] = []
    with open(manifest, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        if not reader.fieldnames or not {"path", "label"} <= {name.strip() for name in reader.fieldnames}:
            raise DataError(f"{manifest}: a manifest needs the columns path,label; found {reader.fieldnames}")
        for line_number, row in enumerate(reader, start=2):
            path_text, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not path_text or not label:
                raise DataError(f"{manifest}, line {line_number}: empty path or label")
            path = Path(path_text)
            labelled.append((path if path.is_absolute() else manifest.parent / path, label))
    return _build(manifest.parent, labelled, "csv", [])


def _build(
    root: Path,
    labelled: list[tuple[Path, str]],
    layout: str,
    ignored: list[tuple[str, str]],
    keep_empty_classes: Sequence[str] = (),
) -> LabelledImages:
    if not labelled:
        left_out = describe_left_out(ignored)
        raise DataError(f"{root}: no images found (layout {layout})" + (f"; {left_out}" if left_out else ""))
    class_names = sorted({label for _, label in labelled} | set(keep_empty_classes))
    index = {name: i for i, name in enumerate(class_names)}
    return LabelledImages(
        root, [path for path, _ in labelled], [index[label] for _, label in labelled], class_names, layout, ignored
    )


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for train and validation, stratified by label and reproducible for a seed.

    Every class with at least two images keeps at least one in each part, so no class silently disappears from
    validation on small data sets.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    generator = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    train_indices: list[int] = []
    val_indices: list[int] = []
    for label in np.unique(labels_array):
        members = np.flatnonzero(labels_array == label)
        generator.shuffle(members)
        count_val = int(round(len(members) * val_fraction))
        if len(members) >= 2:
            count_val = min(max(count_val, 1), len(members) - 1)
        val_indices.extend(members[:count_val].tolist())
        train_indices.extend(members[count_val:].tolist())
    return sorted(train_indices), sorted(val_indices)


# ---------------------------------------------------------------- several sources


@dataclass
class SourceSummary:
    """One data source as it was read: where, in which layout, how many photos of each class, how many dropped as
    copies of a photo met earlier."""

    source: str
    layout: str
    class_counts: dict[str, int]
    duplicates: int = 0


@dataclass
class MergeReport:
    """What merging several sources did: each source, the byte-identical copies left out ((dropped, kept) paths,
    with whether their labels disagreed), and the class names told apart only by case (mapped to the first
    source's spelling)."""

    sources: list[SourceSummary]
    duplicates: list[tuple[str, str, bool]] = field(default_factory=list)  # (dropped path, kept path, labels differ)
    renamed_classes: dict[str, str] = field(default_factory=dict)  # spelling met later -> the class it joined

    @property
    def label_conflicts(self) -> int:
        return sum(differ for _, _, differ in self.duplicates)

    def describe(self) -> str:
        """One line per fact: the sources, the duplicates (by source), the classes merged by case, the classes some
        source lacks."""
        lines = [f"data source {i + 1}: {s.source} ({s.layout}, {sum(s.class_counts.values())} images: "
                 + ", ".join(f"{name} {count}" for name, count in s.class_counts.items() if count) + ")"
                 + (f"; {s.duplicates} copies of photos met earlier left out" if s.duplicates else "")
                 for i, s in enumerate(self.sources)]
        if self.duplicates:
            dropped, kept, _ = self.duplicates[0]
            lines.append(f"duplicates: {len(self.duplicates)} byte-identical files left out (e.g. {dropped} = {kept})"
                         + (f", {self.label_conflicts} of them labelled differently from the copy kept (its label kept)"
                            if self.label_conflicts else ""))
        for later, joined in self.renamed_classes.items():
            lines.append(f"classes: {later!r} taken as {joined!r} (names differ only in case)")
        if len(self.sources) > 1:
            every = sorted({name for s in self.sources for name in s.class_counts})
            for s in self.sources:
                missing = [name for name in every if not s.class_counts.get(name)]
                if missing:
                    lines.append(f"classes: {s.source} has no photos of {', '.join(missing)} (the classes are the union of the sources)")
        return "\n".join(lines)


def content_digest(path: str | os.PathLike) -> str:
    """The SHA-1 of a file's bytes (the feature cache's key too): byte-identical files share it."""
    digest = hashlib.sha1()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def common_root(roots: Sequence[Path]) -> Path:
    """The deepest folder holding every root (absolute, links not resolved), what merged paths are relative to."""
    folders = [os.path.abspath(root if Path(root).is_dir() else Path(root).parent) for root in roots]
    return Path(os.path.commonpath(folders))


def merge_sources(parts: Sequence[LabelledImages], names: Sequence[str]) -> tuple[LabelledImages, MergeReport]:
    """One labelled set from several (each discovered on its own, `names` saying where from), for one split. The
    classes are the union of the sources' (a name told apart from an earlier one only by case joins it); a file
    whose bytes equal a file already taken, in this source or an earlier one, is left out (a copy labelled
    differently keeps the first label, and is counted as a conflict); paths become absolute under the sources'
    common folder. One source comes back as it is (nothing hashed: `catdog data audit` lists its duplicates)."""
    if len(parts) == 1:
        only = parts[0]
        return only, MergeReport([SourceSummary(str(names[0]), only.layout, only.class_counts())])
    spelling: dict[str, str] = {}
    renamed: dict[str, str] = {}
    for part in parts:
        for name in part.class_names:
            first = spelling.setdefault(name.lower(), name)
            if first != name:
                renamed[name] = first
    class_names = sorted(set(spelling.values()))
    index = {name: i for i, name in enumerate(class_names)}
    seen: dict[str, tuple[str, int]] = {}
    paths: list[Path] = []
    labels: list[int] = []
    ignored: list[tuple[str, str]] = []
    duplicates: list[tuple[str, str, bool]] = []
    summaries: list[SourceSummary] = []
    for part, name in zip(parts, names):
        summary = SourceSummary(str(name), part.layout, {})
        for path, label in zip(part.paths, part.labels):
            class_name = spelling[part.class_names[label].lower()]
            absolute = Path(os.path.abspath(path))
            try:
                key = content_digest(absolute)
            except OSError:
                key = f"unreadable:{absolute}"  # kept: the loader reports it as training skips it
            if key in seen:
                kept_path, kept_label = seen[key]
                duplicates.append((str(absolute), kept_path, kept_label != index[class_name]))
                summary.duplicates += 1
                continue
            seen[key] = (str(absolute), index[class_name])
            paths.append(absolute)
            labels.append(index[class_name])
            summary.class_counts[class_name] = summary.class_counts.get(class_name, 0) + 1
        ignored.extend(part.ignored)
        summary.class_counts = {name: summary.class_counts.get(name, 0) for name in class_names}
        summaries.append(summary)
    layout = "+".join(dict.fromkeys(part.layout for part in parts))
    merged = LabelledImages(common_root([part.root for part in parts]), paths, labels, class_names, layout, ignored)
    return merged, MergeReport(summaries, duplicates, renamed)


def discover_sources(sources: Sequence[str | os.PathLike], layout: str = "auto") -> tuple[LabelledImages, MergeReport]:
    """`discover` each source (folders or CSV manifests, each in its own layout when `layout` is "auto"), then
    `merge_sources`."""
    if not sources:
        raise DataError("no data source given")
    parts = [discover(source, layout) for source in sources]
    return merge_sources(parts, [str(source) for source in sources])


def default_num_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))
