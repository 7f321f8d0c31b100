"""`catdog data audit`: decode every file fully, in parallel, and say what is wrong with the data set.

Per file: empty, truncated, not an image, unsupported format, over the pixel limit, tiny; the colour mode it was
converted from (CMYK, RGBA, palette, 16-bit, 1-bit, grayscale); EXIF rotation; animation. Across files: exact
duplicates (same bytes, SHA-256) and near duplicates (64-bit difference hash within a few bits), flagged as
likely label conflicts when a group spans classes.

Writes `audit.json` (everything), `quarantine.txt` (files that cannot be used) and prints a summary. The report
is cached by path, size and modification time: `catdog train` reuses a current audit to skip bad files up front
(training also survives any file that breaks later).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from catdog.training.config import AuditConfig
from catdog.runtime.data import discover, find_image_files
from catdog.runtime.files import write_json_atomic, write_text_atomic
from catdog.runtime.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

TINY_SIDE = 32
HASH_SIDE = 16  # a 16x16 difference hash: 256 bits (8x8 ones confuse photos that merely share a layout)
CONVERTED_MODES = {"CMYK": "CMYK", "RGBA": "transparency", "LA": "transparency", "P": "palette", "1": "1-bit",
                   "L": "grayscale", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit integer", "F": "float"}
EXIT_PROBLEMS_FOUND = 0  # an audit that finds problems has still done its job


def difference_hash(image: Image.Image, side: int = HASH_SIDE) -> str:
    """dHash as hex: brightness gradients of a (side+1) x side grayscale thumbnail; robust to resizing and
    re-encoding, different for different photos."""
    small = np.asarray(image.convert("L").resize((side + 1, side), Image.Resampling.BILINEAR), dtype=np.int16)
    return np.packbits((small[:, 1:] > small[:, :-1]).flatten()).tobytes().hex()


def audit_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Everything the audit wants to know about one file; never raises."""
    record: dict = {"path": path}
    try:
        stat = os.stat(path)
        record.update(bytes=stat.st_size, mtime=stat.st_mtime)
        data = Path(path).read_bytes()
        record["sha256"] = hashlib.sha256(data).hexdigest()
    except OSError as error:
        record["error"] = "unreadable file"
        record["detail"] = str(error)
        return record
    try:
        image = load_image(data, max_pixels=max_pixels, name=path)
    except ImageLoadError as error:
        record["error"], record["detail"] = error.reason, error.detail
        return record
    notes = []
    try:
        with Image.open(Path(path)) as original:
            record["format"] = original.format
            mode = original.mode
            if mode in CONVERTED_MODES or (mode == "P" and "transparency" in original.info):
                notes.append(f"converted from {CONVERTED_MODES.get(mode, mode)}")
            if original.getexif().get(0x0112, 1) not in (0, 1):
                notes.append("EXIF-rotated")
            if getattr(original, "n_frames", 1) > 1:
                notes.append(f"animated ({original.n_frames} frames, first used)")
    except Exception:  # the loader already accepted the file; header details are a bonus
        pass
    record["width"], record["height"] = image.size
    if min(image.size) < TINY_SIDE:
        notes.append(f"tiny ({image.size[0]}x{image.size[1]})")
    record["notes"] = notes
    record["dhash"] = difference_hash(image)
    return record


_BIT_COUNTS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def near_duplicate_pairs(hashes: list[str], max_bits: int, chunk: int = 64) -> list[tuple[int, int, int]]:
    """(i, j, distance) for i < j whose hex hashes differ in at most `max_bits` bits (vectorised, chunked)."""
    if len(hashes) < 2:
        return []
    values = np.array([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in hashes])
    pairs = []
    for start in range(0, len(values), chunk):
        block = values[start : start + chunk, None, :] ^ values[None, :, :]
        distances = _BIT_COUNTS[block].sum(axis=-1, dtype=np.int32)
        rows, columns = np.nonzero(distances <= max_bits)
        for row, column in zip(rows.tolist(), columns.tolist()):
            i = start + row
            if i < column:
                pairs.append((i, column, int(distances[row, column])))
    return pairs


def _groups(pairs: list[tuple[int, int]], count: int) -> list[list[int]]:
    parent = list(range(count))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(i)] = find(j)
    members = defaultdict(list)
    for i in range(count):
        members[find(i)].append(i)
    return [sorted(group) for group in members.values() if len(group) > 1]


def audit_cache_path(root: Path) -> Path:
    from catdog.training.features import default_cache_dir

    return default_cache_dir() / "audits" / (hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16] + ".json")


def run_audit(config: AuditConfig, log=print) -> int:
    report = audit(config, log)
    log(format_summary(report))
    return EXIT_PROBLEMS_FOUND


def audit(config: AuditConfig, log=print) -> dict:
    started = time.perf_counter()
    source = Path(config.data)
    try:
        images = discover(source, config.layout)
        paths, labels, class_names, root, ignored = images.paths, images.labels, images.class_names, images.root, images.ignored
    except Exception:
        paths, ignored = find_image_files(source)
        labels, class_names, root = [None] * len(paths), [], source
    workers = config.workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers) as pool:
        records = list(pool.map(audit_file, [str(p) for p in paths], [config.max_pixels] * len(paths), chunksize=32))
    for record, label in zip(records, labels):
        record["label"] = class_names[label] if label is not None else None
    by_digest = defaultdict(list)
    for index, record in enumerate(records):
        if "sha256" in record and "error" not in record:
            by_digest[record["sha256"]].append(index)
    exact_groups = [group for group in by_digest.values() if len(group) > 1]
    decodable = [i for i, r in enumerate(records) if "dhash" in r]
    pairs = near_duplicate_pairs([records[i]["dhash"] for i in decodable], config.near_duplicate_bits)
    near_groups = [[decodable[i] for i in group] for group in _groups([(i, j) for i, j, _ in pairs], len(decodable))]

    def describe(group):
        classes = sorted({records[i]["label"] for i in group if records[i]["label"]})
        return {"files": [records[i]["path"] for i in group], "classes": classes, "label_conflict": len(classes) > 1}

    report = {
        "data": str(source), "root": str(root), "files": len(records), "seconds": round(time.perf_counter() - started, 2),
        "errors": [{"path": r["path"], "reason": r["error"], "detail": r.get("detail", "")} for r in records if "error" in r],
        "notes": [{"path": r["path"], "notes": r["notes"]} for r in records if r.get("notes")],
        "exact_duplicates": [describe(g) for g in exact_groups],
        "near_duplicates": [describe(g) for g in near_groups if not any(set(g) == set(e) for e in exact_groups)],
        "ignored": [{"path": p, "why": why} for p, why in ignored],
        "fingerprints": {r["path"]: [r.get("bytes"), r.get("mtime")] for r in records},
    }
    report["label_conflicts"] = sum(g["label_conflict"] for g in report["exact_duplicates"] + report["near_duplicates"])
    out_dir = Path(config.out or f"audit-{source.resolve().name}")
    write_json_atomic(out_dir / "audit.json", report)
    write_text_atomic(out_dir / "quarantine.txt", "".join(f"{e['path']}\t{e['reason']}\n" for e in report["errors"]))
    write_json_atomic(audit_cache_path(Path(root)), report)
    log(f"wrote {out_dir / 'audit.json'} and {out_dir / 'quarantine.txt'}")
    return report


def format_summary(report: dict) -> str:
    lines = [f"audited {report['files']} files in {report['seconds']} s"]
    reasons = defaultdict(int)
    for error in report["errors"]:
        reasons[error["reason"]] += 1
    lines.append(f"  unusable: {len(report['errors'])}" + "".join(f"\n    {reason}: {count}" for reason, count in sorted(reasons.items())))
    kinds = defaultdict(int)
    for entry in report["notes"]:
        for note in entry["notes"]:
            kinds[note.split(" (")[0]] += 1
    lines.append(f"  usable but unusual: {len(report['notes'])}" + "".join(f"\n    {kind}: {count}" for kind, count in sorted(kinds.items())))
    lines.append(f"  exact duplicate groups: {len(report['exact_duplicates'])}")
    for group in report["exact_duplicates"][:10]:
        lines.append("    " + "  ==  ".join(group["files"]) + ("   [LABEL CONFLICT]" if group["label_conflict"] else ""))
    lines.append(f"  near duplicate groups: {len(report['near_duplicates'])}")
    for group in report["near_duplicates"][:10]:
        lines.append("    " + "  ~  ".join(group["files"]) + ("   [LABEL CONFLICT]" if group["label_conflict"] else ""))
    lines.append(f"  groups whose files carry different labels: {report['label_conflicts']}")
    return "\n".join(lines)


def current_audit_errors(root: Path, paths: list[Path]) -> dict[str, str] | None:
    """Bad files according to a cached audit of `root`, if that audit is current for every path (same size and
    modification time); None when there is no current audit."""
    cache = audit_cache_path(root)
    if not cache.is_file():
        return None
    try:
        report = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    fingerprints = report.get("fingerprints", {})
    for path in paths:
        known = fingerprints.get(str(path))
        try:
            stat = path.stat()
        except OSError:
            return None
        if known is None or known[0] != stat.st_size or known[1] != stat.st_mtime:
            return None
    return {error["path"]: error["reason"] for error in report["errors"]}
