"""Do the test-time rules do harm on photos they were not chosen on? (issue 24, "Defaults that do no harm")

The rules: the orientation check (--check-orientation / --no-check-orientation), the mirror view for unsure photos
(--no-tta turns it off) and the noise filter (the run's meta.json `preprocess.denoise_above`; its test-time effect alone is measured on a
copy of the run with the field removed, whose model.onnx catdog re-exports into the cache on first use).

Every setting names each rule explicitly, so the script measures any catdog version alike (0.5.2 had the check on by
default, 0.6 has it off); "as shipped" is the version's own defaults. Clean table: `catdog predict` on a labelled
folder (Kaggle naming, cat.1.jpg ...) under each setting: accuracy, log loss (natural log, of the CSV's calibrated
probability of the true class) and, against all rules on and against all rules off, answers changed, right->wrong, wrong->right and right->wrong at a new confidence >= 0.9; then every
photo a rule turns right->wrong at >= 0.9. With --corruptions, also `catdog evaluate --corruptions` on the same
folder: accuracy and log loss at the stronger severity of each kind of damage, each rule on (all on) and off
(--with-denoise adds the filter, through the edited copy: a second pass of feature extraction).

    python benchmarks/default_rules.py --run RUN --data LABELLED_DIR [--corruptions [--with-denoise]] [--work DIR]

It shells out to `sys.executable -m catdog`, so it measures whichever catdog that interpreter imports (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CATDOG = [sys.executable, "-m", "catdog"]
CONFIDENT = 0.9
# setting: (predict flags, whether the run keeps its noise filter)
SETTINGS = {
    "all on": (["--check-orientation"], True),
    "as shipped": ([], True),
    "no orientation": (["--no-check-orientation"], True),
    "no mirror": (["--check-orientation", "--no-tta"], True),
    "no denoise": (["--check-orientation"], False),
    "all off": (["--no-check-orientation", "--no-tta"], False),
    "orientation only": (["--check-orientation", "--no-tta"], False),
    "mirror only": (["--no-check-orientation"], False),
    "denoise only": (["--no-check-orientation", "--no-tta"], True),
}
# rule: (setting with it off, from all on), (setting with it alone on, from all off)
RULES = {"orientation": ("no orientation", "orientation only"), "mirror": ("no mirror", "mirror only"),
         "denoise": ("no denoise", "denoise only")}


def catdog(arguments: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(CATDOG + arguments, capture_output=True, text=True)
    if result.returncode not in (0, 3):  # 3: some files unreadable, the CSV is still written
        sys.exit(f"catdog {' '.join(arguments)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - started


def without_denoise(run: Path, work: Path) -> Path | None:
    """A copy of the run whose meta.json has no noise filter (None when the run has none to remove)."""
    meta = json.loads((run / "meta.json").read_text())
    if not meta.get("preprocess", {}).get("denoise_above"):
        return None
    copy = work / "run-without-denoise"
    if not copy.exists():
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("model.onnx", "evaluation*"))
        del meta["preprocess"]["denoise_above"]
        (copy / "meta.json").write_text(json.dumps(meta, indent=2))
    return copy


def predictions(csv_path: Path) -> dict:
    """file name -> (truth, label, confidence, probability of the truth)."""
    rows = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            name = Path(row["path"]).name
            truth = name.split(".")[0]
            rows[name] = (truth, row["label"], float(row["confidence"]), float(row[f"prob_{truth}"]))
    return rows


def figures(rows: dict) -> tuple[float, float]:
    accuracy = sum(truth == label for truth, label, _, _ in rows.values()) / len(rows)
    log_loss = -sum(math.log(min(max(p, 1e-15), 1.0)) for *_, p in rows.values()) / len(rows)
    return accuracy, log_loss


def changes(before: dict, after: dict) -> dict:
    common = before.keys() & after.keys()
    right = {name: before[name][0] == before[name][1] for name in common}
    now_right = {name: after[name][0] == after[name][1] for name in common}
    worse = sorted(name for name in common if right[name] and not now_right[name])
    return {"touched": sum(abs(before[n][3] - after[n][3]) > 1e-6 for n in common),
            "changed": sum(before[n][1] != after[n][1] for n in common), "worse": worse,
            "wrong_to_right": sum(not right[n] and now_right[n] for n in common),
            "confident": [n for n in worse if after[n][2] >= CONFIDENT]}


def clean_table(run: Path, data: Path, work: Path) -> None:
    plain = without_denoise(run, work)
    results, seconds = {}, {}
    for name, (flags, denoise) in SETTINGS.items():
        if plain is None and name in ("no denoise", "denoise only"):
            continue  # the run has no filter: the rows would repeat others
        output = work / f"clean-{name.replace(' ', '-')}.csv"
        seconds[name] = catdog(["predict", "--run", str(run if denoise or plain is None else plain), str(data),
                                "--output", str(output), "--no-progress"] + flags)
        results[name] = predictions(output)
    print(f"clean: {len(results['all on'])} photos of {data}")
    print("touched: photos whose probabilities moved; chg: answers changed; r>w, w>r: right->wrong, wrong->right; "
          f"r>w@.9: right->wrong at a new confidence >= {CONFIDENT}")
    print(f"{'setting':<17}{'accuracy':>9}{'log loss':>10}{'seconds':>8}  vs all on: touched chg r>w w>r r>w@.9"
          "  vs all off: touched chg r>w w>r r>w@.9")
    for name, rows in results.items():
        accuracy, log_loss = figures(rows)
        versus = [changes(results[base], rows) for base in ("all on", "all off")]
        cells = "".join(f"{c['touched']:>21}{c['changed']:>4}{len(c['worse']):>4}{c['wrong_to_right']:>4}"
                        f"{len(c['confident']):>7}" for c in versus)
        print(f"{name:<17}{accuracy:>9.4f}{log_loss:>10.5f}{seconds[name]:>8.1f}{cells}")
    print(f"each rule's right -> wrong photos (file: label confidence before -> after; ! at >= {CONFIDENT})")
    for rule, (off, alone) in RULES.items():
        for before, after in ((off, "all on"), ("all off", alone)):
            if before in results and after in results:
                found = changes(results[before], results[after])["worse"]
                listed = ", ".join(f"{n}: {results[before][n][1]} {results[before][n][2]:.3f} -> {results[after][n][1]} "
                                   f"{results[after][n][2]:.3f}{'!' if results[after][n][2] >= CONFIDENT else ''}"
                                   for n in found)
                print(f"  {rule} on ({before} -> {after}): {listed or 'none'}")


def strong_rows(run: Path, data: Path, out: Path, flags: list[str]) -> tuple[dict, float]:
    seconds = catdog(["evaluate", "--run", str(run), "--data", str(data), "--out", str(out), "--corruptions"] + flags)
    table = json.loads((out / "metrics.json").read_text())["corruptions"]
    rows = {row["kind"]: row for row in table["conditions"] if row["level"] == "strong"}
    return {"clean": table["clean"], **rows}, seconds


def corruption_table(run: Path, data: Path, work: Path, with_denoise: bool) -> None:
    settings = {"all on": (run, ["--check-orientation"]), "orientation": (run, ["--no-check-orientation"]),
                "mirror": (run, ["--check-orientation", "--no-tta"])}
    plain = without_denoise(run, work) if with_denoise else None
    if plain is not None:
        settings["denoise"] = (plain, ["--check-orientation"])
    tables = {}
    for name, (directory, flags) in settings.items():
        tables[name], seconds = strong_rows(directory, data, work / f"evaluate-{name}", flags)
        print(f"evaluate --corruptions, {name if name == 'all on' else name + ' off'}: {seconds:.0f} s", flush=True)
    rules = [name for name in tables if name != "all on"]
    print("strong damage: accuracy / log loss, all rules on and each rule off; * the rule does harm")
    print(f"{'kind':<11}{'on':>17}  " + "".join(f"{name + ' off':>22}" for name in rules))
    for kind, on in tables["all on"].items():
        cells = ""
        for name in rules:
            off = tables[name][kind]
            harm = on["accuracy"] < off["accuracy"] or round(on["log_loss"], 5) > round(off["log_loss"], 5)
            cells += f"{off['accuracy']:>13.4f} {off['log_loss']:.5f}{'*' if harm else ' '}"
        print(f"{kind:<11}{on['accuracy']:>9.4f} {on['log_loss']:.5f}  {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="run directory made by catdog train")
    parser.add_argument("--data", required=True, type=Path, help="labelled photos named <class>.<id>.<ext>")
    parser.add_argument("--corruptions", action="store_true", help="also the strong-damage table (minutes)")
    parser.add_argument("--with-denoise", action="store_true", help="with --corruptions: the noise filter too")
    parser.add_argument("--work", type=Path, help="where CSVs, evaluations and the edited run go (default: temporary)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="default-rules-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"outputs in {work}")
    clean_table(args.run, args.data, work)
    if args.corruptions:
        corruption_table(args.run, args.data, work, args.with_denoise)


if __name__ == "__main__":
    main()
