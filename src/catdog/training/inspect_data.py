"""`catdog data inspect`: what is in a data set before training on it.

Counts per class (and the imbalance), image size statistics from the file headers, files that cannot be opened,
and a grid of sample images per class saved as PNG. Headers are read in parallel threads; a full decode of every
file is `catdog data audit`'s job.
"""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from catdog.training.config import InspectConfig
from catdog.runtime.data import discover
from catdog.runtime.files import write_json_atomic, write_with_atomic
from catdog.runtime.images import ALLOWED_FORMATS, ImageLoadError, load_image


def read_header(path: Path) -> tuple[str, tuple[int, int] | None, str | None, str]:
    """(path, size or None, format, problem) from the header alone."""
    try:
        if path.stat().st_size == 0:
            return str(path), None, None, "empty file"
        with Image.open(path, formats=ALLOWED_FORMATS) as image:
            return str(path), image.size, image.format, ""
    except Exception as error:  # reported per file, never fatal
        return str(path), None, None, f"cannot open: {type(error).__name__}"


def inspect_data(config: InspectConfig, log=print) -> dict:
    images = discover(config.data, config.layout)
    out_dir = Path(config.out or f"inspect-{Path(config.data).resolve().name}")
    with ThreadPoolExecutor(max_workers=8) as pool:
        headers = list(pool.map(read_header, images.paths))
    sizes = np.array([size for _, size, _, _ in headers if size], dtype=np.int64).reshape(-1, 2)
    unreadable = [{"path": path, "problem": problem} for path, _, _, problem in headers if problem]
    counts = images.class_counts()
    report = {
        "data": str(config.data),
        "root": str(images.root),
        "layout": images.layout,
        "images": len(images),
        "classes": counts,
        "imbalance_ratio": round(max(counts.values()) / max(1, min(counts.values())), 3),
        "formats": dict(Counter(fmt for _, _, fmt, _ in headers if fmt)),
        "unreadable": unreadable,
        "ignored_files": [{"path": p, "why": why} for p, why in images.ignored],
    }
    if len(sizes):
        report["size"] = {
            axis: {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max()), "mean": round(float(values.mean()), 1)}
            for axis, values in (("width", sizes[:, 0]), ("height", sizes[:, 1]))
        }
        report["distinct_sizes"] = len({tuple(s) for s in sizes.tolist()})
    grid_path = out_dir / "sample_grid.png"
    save_sample_grid(images, grid_path, config.samples_per_class, config.seed)
    report["sample_grid"] = str(grid_path)
    write_json_atomic(out_dir / "report.json", report)
    log(format_report(report))
    log(f"wrote {out_dir / 'report.json'} and {grid_path}")
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['images']} images, layout {report['layout']}, root {report['root']}"]
    total = max(1, report["images"])
    for name, count in report["classes"].items():
        lines.append(f"  {name:>12}: {count:7d}  ({100 * count / total:5.1f}%)")
    lines.append(f"  imbalance (largest / smallest class): {report['imbalance_ratio']}")
    if "size" in report:
        w, h = report["size"]["width"], report["size"]["height"]
        lines.append(f"  width  min {w['min']}, median {w['median']:.0f}, max {w['max']}")
        lines.append(f"  height min {h['min']}, median {h['median']:.0f}, max {h['max']}; {report['distinct_sizes']} distinct sizes")
    lines.append(f"  formats: {report['formats']}")
    lines.append(f"  unreadable: {len(report['unreadable'])}" + "".join(f"\n    {u['path']}: {u['problem']}" for u in report["unreadable"][:20]))
    if report["ignored_files"]:
        lines.append(f"  not taken as images: {len(report['ignored_files'])}")
    return "\n".join(lines)


def save_sample_grid(images, path: Path, per_class: int, seed: int, tile: int = 128) -> None:
    """One row per class, `per_class` random images each, labelled with the class name."""
    from catdog.training.plotting import headless_pyplot

    plt = headless_pyplot()

    generator = random.Random(seed)
    rows = len(images.class_names)
    figure, axes = plt.subplots(rows, per_class, figsize=(per_class * 1.4, rows * 1.5), squeeze=False)
    for label, name in enumerate(images.class_names):
        members = [p for p, l in zip(images.paths, images.labels) if l == label]
        chosen = generator.sample(members, min(per_class, len(members)))
        for column in range(per_class):
            axis = axes[label][column]
            axis.axis("off")
            if column >= len(chosen):
                continue
            try:
                picture = load_image(chosen[column], draft_size=tile)
                picture.thumbnail((tile, tile))
                axis.imshow(picture)
            except ImageLoadError:
                axis.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
            if column == 0:
                axis.set_title(name, fontsize=9, loc="left")
    figure.tight_layout()
    write_with_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    plt.close(figure)
