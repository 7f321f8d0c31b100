"""Saying "neither", as shipped (#17): the runs a user trains and the built-in model, measured with catdog's own commands.

For the default run, the fast preset, a fine-tuned run and the built-in zero-training model: AUROC against the
validation photos, and at the stored threshold the share of not-pets accepted (overall and per folder: people,
animals, objects, scenes, and the not-pets-near leopards) and of validation photos refused. Nothing is scored here:

- trained runs: `catdog train` (or the runs already in --work with --reuse), then `catdog evaluate --run RUN
  --ood-data DIR` once for not-pets (its sub-folders are the groups of metrics.json) and once for not-pets-near;
- the default run's refused validation photos: `catdog predict --run RUN` on its validation split (split.json),
  the rows whose `in_distribution` is false, listed so a person can look at them;
- the built-in model: `catdog predict` with no model on the 6,000 photos and on both folders; the shares come from
  the CSV's `in_distribution` column, the AUROC from its `ood_score` column (scikit-learn's roc_auc_score).

    .venv/bin/python benchmarks/ood.py [--work /tmp/catdog-ood] [--reuse] [--markdown /tmp/sections/ood.md]

Fine-tuning on a 2-core CPU shared with other jobs is slow: a 400-photo probe (fast preset, whole network, one
epoch) trained at 1.0 photo/s and ran the network forward at ~2.7 photos/s, so on the 6,000 photos the bank
(4,800 photos) and validation passes alone would take the better part of an hour. The fine-tuned run is therefore,
by default, the fast preset's EfficientNet-Lite0 with the output-end quarter of its backbone's weights trainable,
one epoch (short warmup), on 1,000 of the photos (`FINETUNE_ARGS`, --finetune-photos; about 20 minutes here), and
the fast preset's frozen backbone is trained on the same 1,000 photos as a control (same 800-photo bank, same
200-photo validation split), so that what fine-tuning changes is told apart from what the small data set does.
`--finetune-photos 0 --finetune-args="--strategy finetune"` measures the real thing where there is time (a GPU).
Writes ood.json (every figure, the refused photos) into --work.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CATDOG, machine_description, require_shared_data, run_timed  # noqa: E402

FINETUNE_ARGS = "--preset fast --strategy finetune --epochs 1 --warmup-epochs 0.1 --unfreeze 0.25"
FINETUNE_PHOTOS = 1000
FOLDERS = ("people", "animals", "objects", "scenes")
# The acceptance checks (#17).
TRAINED_TARGETS = {"auroc": 0.999, "accepted": 0.01, "folder": 0.03, "refused": 0.015}
NEAR_TARGETS = {"auroc": 0.99, "accepted": 0.10}
BUILTIN_TARGETS = {"refused": 0.02, "accepted": 0.02}


def train_run(name: str, work: Path, data: Path, extra: list[str], reuse: bool) -> float | None:
    """`catdog train` into work/name; its wall seconds (kept in work/name-train.json, so --reuse still has them)."""
    run, record = work / name, work / f"{name}-train.json"
    if reuse and (run / "meta.json").is_file():
        print(f"{name}: reusing {run}", flush=True)
        return json.loads(record.read_text())["seconds"] if record.is_file() else None
    if run.exists():
        sys.exit(f"{run} exists: pass --reuse to use it, or remove it")
    seconds, output = run_timed(CATDOG + ["train", "--data", str(data), "--out", str(run), "--no-progress"] + extra)
    record.write_text(json.dumps({"seconds": seconds, "args": extra, "data": str(data), "log": output}, indent=2))
    print(f"{name}: catdog train {' '.join(extra)} in {seconds / 60:.1f} min", flush=True)
    print("  " + "\n  ".join(line for line in output.splitlines()
                             if line.startswith(("data:", "epoch", "out-of-distribution", "validation", "time"))), flush=True)
    return seconds


def photo_subset(data: Path, count: int, folder: Path) -> Path:
    """A Kaggle-layout folder of symbolic links to `count` photos of `data`, half cats and half dogs, spread evenly
    over the file numbers (the fine-tuned run's data when fine-tuning on all 6,000 takes too long)."""
    if count <= 0:
        return data
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("cat", "dog"):
        photos = sorted(data.glob(f"{name}.*.jpg"), key=lambda path: int(path.name.split(".")[1]))
        step = max(1, len(photos) // (count // 2))
        for photo in photos[::step][: count // 2]:
            link = folder / photo.name
            if not link.is_symlink():
                link.symlink_to(photo)
    return folder


def evaluate_ood(run: Path, folder: Path, name: str, reuse: bool) -> dict:
    """`catdog evaluate --ood-data folder`: metrics.json's out_of_distribution entry, or {"error": ...}."""
    out = run / f"evaluation-{name}"
    if not (reuse and (out / "metrics.json").is_file()):
        try:
            seconds, _ = run_timed(CATDOG + ["evaluate", "--run", str(run), "--ood-data", str(folder), "--out", str(out)])
        except RuntimeError as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            print(f"{run.name}: evaluate --ood-data {folder} failed: {lines[-1] if lines else error}", flush=True)
            return {"error": lines[-1] if lines else str(error)}
        print(f"{run.name}: evaluate --ood-data {folder.name} in {seconds:.0f} s", flush=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {**metrics["out_of_distribution"], "accuracy": metrics["accuracy"], "log_loss": metrics["log_loss"]}


def predict_csv(paths: list[str], output: Path, reuse: bool, run: Path | None = None) -> list[dict]:
    """`catdog predict [--run RUN] paths... --output output`, its rows (with --reuse, those of an earlier output)."""
    command = CATDOG + ["predict", *paths, "--output", str(output), "--no-progress"]
    if run is not None:
        command += ["--run", str(run)]
    if not (reuse and output.is_file()):
        seconds, log = run_timed(command)
        output.with_suffix(".log").write_text(" ".join(command) + "\n" + log)  # says which model predicted
        print(f"{run.name if run else 'built-in'}: predict {len(paths) if len(paths) > 3 else ' '.join(paths)} "
              f"in {seconds:.0f} s", flush=True)
    with output.open(newline="") as handle:
        return list(csv.DictReader(handle))


def refused_validation_photos(run: Path, work: Path, reuse: bool) -> dict:
    """The run's validation photos (split.json) that `catdog predict --run` calls neither."""
    split = json.loads((run / "split.json").read_text())
    paths = [str(Path(split["root"]) / relative) for relative in split["val"]]
    rows = predict_csv(paths, work / f"{run.name}-validation-predictions.csv", reuse, run)
    if not rows or "in_distribution" not in rows[0]:
        return {"error": "predict wrote no in_distribution column"}
    refused = sorted((row for row in rows if row["in_distribution"] == "false"), key=lambda row: -float(row["ood_score"]))
    return {"photos": len(rows), "refused_share": len(refused) / len(rows),
            "refused": [{"file": Path(row["path"]).name, "ood_score": float(row["ood_score"]),
                         "label": row["label"], "confidence": float(row["confidence"])} for row in refused]}


def builtin_model(work: Path, data: Path, not_pets: Path, near: Path, val_names: set[str], reuse: bool) -> dict:
    """The built-in model through `catdog predict` (no model): shares from in_distribution, AUROC from ood_score."""
    from sklearn.metrics import roc_auc_score

    out = work / "builtin"
    out.mkdir(parents=True, exist_ok=True)
    pets = predict_csv([str(data)], out / "pets.csv", reuse)
    others = predict_csv([str(not_pets)], out / "not-pets.csv", reuse)
    leopards = predict_csv([str(near)], out / "not-pets-near.csv", reuse)

    def accepted(rows):
        return sum(row["in_distribution"] == "true" for row in rows) / len(rows)

    def auroc(rows):
        scores = [float(row["ood_score"]) for row in pets] + [float(row["ood_score"]) for row in rows]
        return float(roc_auc_score([0] * len(pets) + [1] * len(rows), scores))

    def folder_of(row):
        return Path(row["path"]).resolve().relative_to(not_pets.resolve()).parts[0]

    groups = {name: {"photos": len(rows := [r for r in others if folder_of(r) == name]), "accepted_share": accepted(rows)}
              for name in sorted({folder_of(row) for row in others})}
    logs = [out / f"{name}.log" for name in ("pets", "not-pets", "not-pets-near")]
    described = [line for log in logs if log.is_file() for line in log.read_text().splitlines() if line.startswith("predicting")]
    model = described[0].split(" with ", 1)[1] if described else "not recorded"
    right = [Path(row["path"]).name.split(".")[0] == row["label"] for row in pets]
    val_rows = [row for row in pets if Path(row["path"]).name in val_names]
    return {
        "model": model, "pets": len(pets), "pets_refused_share": 1 - accepted(pets), "accuracy": sum(right) / len(right),
        "validation_photos": len(val_rows), "validation_refused_share": 1 - accepted(val_rows) if val_rows else None,
        "not_pets": {"auroc": auroc(others), "other_photos": len(others), "other_accepted_share": accepted(others),
                     "validation_refused_share": 1 - accepted(pets), "groups": groups},
        "near": {"auroc": auroc(leopards), "other_photos": len(leopards), "other_accepted_share": accepted(leopards)},
    }


def checks(kind: str, result: dict) -> dict[str, bool]:
    """The issue's acceptance checks that apply to this kind of model (pass: True)."""
    found, near = result.get("not_pets", {}), result.get("near", {})
    if "error" in found or "auroc" not in found:
        return {"has an out-of-distribution score": False}
    outcome = {}
    if kind == "builtin":
        outcome[f"<= {BUILTIN_TARGETS['refused']:.0%} of the {result['pets']:,} pet photos refused"] = result["pets_refused_share"] <= BUILTIN_TARGETS["refused"]
        outcome[f"<= {BUILTIN_TARGETS['accepted']:.0%} not-pets accepted"] = found["other_accepted_share"] <= BUILTIN_TARGETS["accepted"]
    else:
        outcome[f"AUROC >= {TRAINED_TARGETS['auroc']}"] = found["auroc"] >= TRAINED_TARGETS["auroc"]
        outcome[f"<= {TRAINED_TARGETS['accepted']:.0%} not-pets accepted"] = found["other_accepted_share"] <= TRAINED_TARGETS["accepted"]
        outcome[f"<= {TRAINED_TARGETS['folder']:.0%} of any folder accepted"] = all(
            group["accepted_share"] <= TRAINED_TARGETS["folder"] for group in found["groups"].values())
        outcome[f"<= {TRAINED_TARGETS['refused']:.1%} validation refused"] = found["validation_refused_share"] <= TRAINED_TARGETS["refused"]
    if kind in ("default", "builtin") and "auroc" in near:
        outcome[f"leopards AUROC >= {NEAR_TARGETS['auroc']}"] = near["auroc"] >= NEAR_TARGETS["auroc"]
        outcome[f"<= {NEAR_TARGETS['accepted']:.0%} leopards accepted"] = near["other_accepted_share"] <= NEAR_TARGETS["accepted"]
    return outcome


def percent(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def markdown(results: dict) -> str:
    photos = results["finetune_photos"]
    subset = (f" on {photos:,} of the photos, half cats and half dogs, and as a control the fast preset's frozen "
              "backbone on the same photos (same bank size)" if photos else "")
    lines = ["## Saying neither, as shipped (`python benchmarks/ood.py`)", "",
             f"Issue 17, measured with the commands a user runs ({results['machine']}): `catdog train --data "
             "../shared/data/dogs-vs-cats/train` (default preset; `--preset fast`; fine-tuned: "
             f"`{results['finetune_args']}`{subset}), then `catdog evaluate --run RUN --ood-data ../shared/data/not-pets` and "
             "`... --ood-data ../shared/data/not-pets-near`; the built-in model: `catdog predict` with no model on the "
             "6,000 photos and on both folders (AUROC from its CSV's `ood_score`). Shares at each model's stored "
             "threshold; \"validation refused\": the run's validation split (seed 42, a fifth of its photos; built-in: "
             "all 6,000 photos, the default run's 1,200 validation photos in brackets).", "",
             "| | accuracy | AUROC not-pets | not-pets accepted | " + " | ".join(FOLDERS)
             + " | leopard AUROC | leopards accepted | validation refused | checks |",
             "| --- |" + " ---: |" * (6 + len(FOLDERS)) + " --- |"]
    for kind, label in (("default", "default preset"), ("fast", "fast preset"), ("finetune", "fine-tuned (see below)"),
                        ("fast-subset", "fast preset, the fine-tuned run's photos"), ("builtin", "built-in model")):
        result = results["runs"].get(kind)
        if result is None:
            continue
        found, near = result.get("not_pets", {}), result.get("near", {})
        if "auroc" not in found:
            lines.append(f"| {label} | " + " | ".join([""] * (6 + len(FOLDERS)))
                         + f" | no score: {found.get('error', 'not measured')} |")
            continue
        refused = (f"{percent(result['pets_refused_share'])} of {result['pets']:,} ({percent(result['validation_refused_share'])} "
                   f"of {result['validation_photos']:,})" if kind == "builtin"
                   else f"{percent(found['validation_refused_share'])} of {found['validation_photos']:,}")
        failed = [name for name, ok in result["checks"].items() if not ok]
        verdict = "all pass" if not failed else "FAIL: " + "; ".join(failed)
        accuracy = result.get("accuracy", found.get("accuracy"))
        lines.append(f"| {label} | {percent(accuracy)} | {found['auroc']:.4f} | {percent(found['other_accepted_share'])} | "
                     + " | ".join(percent(found["groups"].get(name, {}).get("accepted_share")) for name in FOLDERS)
                     + f" | {near['auroc']:.4f} | {percent(near['other_accepted_share'])} | {refused} | {verdict} |"
                     if "auroc" in near else
                     f"| {label} | {percent(accuracy)} | {found['auroc']:.4f} | {percent(found['other_accepted_share'])} | "
                     + " | ".join(percent(found["groups"].get(name, {}).get("accepted_share")) for name in FOLDERS)
                     + f" | n/a | n/a | {refused} | {verdict} |")
    if "builtin" in results["runs"]:
        lines += ["", f"The built-in model measured: {results['runs']['builtin']['model']} (as `catdog predict` names it)."]
    seconds = {kind: result.get("train_seconds") for kind, result in results["runs"].items()}
    lines += ["", "`catdog train` wall time on this shared machine (minutes): "
              + ", ".join(f"{kind} {value / 60:.1f}" for kind, value in seconds.items() if value) + "."]
    refused = results.get("default_refused_validation", {})
    if refused.get("refused"):
        lines += ["", f"The default run's refused validation photos (`catdog predict --run`, "
                  f"{len(refused['refused'])} of {refused['photos']:,}, highest score first): "
                  + ", ".join(f"{row['file']} ({row['ood_score']:.3f})" for row in refused["refused"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/catdog-ood", help="runs, predictions and ood.json")
    parser.add_argument("--reuse", action="store_true", help="use the runs already in --work instead of training them")
    parser.add_argument("--finetune-args", default=FINETUNE_ARGS, help=f"train options of the fine-tuned run (default: {FINETUNE_ARGS})")
    parser.add_argument("--finetune-photos", type=int, default=FINETUNE_PHOTOS, help="the fine-tuned run trains on this many "
                        f"of the photos (half cats, half dogs; 0: all 6,000) (default: {FINETUNE_PHOTOS})")
    parser.add_argument("--skip", default="", help="comma-separated run kinds to leave out: default, fast, finetune, builtin")
    parser.add_argument("--markdown", default="", help="also write the section to this file")
    arguments = parser.parse_args()
    shared = require_shared_data()
    data, not_pets, near = shared / "train", shared.parent / "not-pets", shared.parent / "not-pets-near"
    for folder in (not_pets, near):
        if not folder.is_dir():
            sys.exit(f"needs {folder}")
    work = Path(arguments.work)
    work.mkdir(parents=True, exist_ok=True)
    skip = {name.strip() for name in arguments.skip.split(",") if name.strip()}
    started = time.perf_counter()
    results = {"machine": machine_description(), "finetune_args": arguments.finetune_args,
               "finetune_photos": arguments.finetune_photos, "runs": {}}
    print(f"saying neither, as shipped: {results['machine']}", flush=True)
    recipes = {"default": [], "fast": ["--preset", "fast"], "finetune": arguments.finetune_args.split()}
    if arguments.finetune_photos > 0:  # the control: the frozen backbone on the fine-tuned run's photos (same bank size)
        recipes["fast-subset"] = ["--preset", "fast"]
    for kind, extra in recipes.items():
        if kind in skip or (kind == "fast-subset" and "finetune" in skip):
            continue
        subset = kind in ("finetune", "fast-subset")
        source = photo_subset(data, arguments.finetune_photos, work / "finetune-data") if subset else data
        try:
            seconds = train_run(kind, work, source, extra, arguments.reuse)
        except RuntimeError as error:
            print(f"{kind}: training failed:\n{error}", flush=True)
            results["runs"][kind] = {"not_pets": {"error": "training failed"}, "checks": {}}
            continue
        run = work / kind
        meta = json.loads((run / "meta.json").read_text())
        result = {"train_args": extra, "train_data": str(source), "train_seconds": seconds, "meta_ood_threshold": meta.get("ood_threshold"),
                  "meta_ood_method": meta.get("ood_method"), "not_pets": evaluate_ood(run, not_pets, "not-pets", arguments.reuse),
                  "near": evaluate_ood(run, near, "not-pets-near", arguments.reuse)}
        result["checks"] = checks(kind, result)
        results["runs"][kind] = result
    if "default" not in skip and (work / "default" / "meta.json").is_file():
        results["default_refused_validation"] = refused_validation_photos(work / "default", work, arguments.reuse)
    if "builtin" not in skip:
        split_file = next((work / kind / "split.json" for kind in recipes if (work / kind / "split.json").is_file()), None)
        val_names = {Path(p).name for p in json.loads(split_file.read_text())["val"]} if split_file else set()
        result = builtin_model(work, data, not_pets, near, val_names, arguments.reuse)
        result["checks"] = checks("builtin", result)
        results["runs"]["builtin"] = result
    results["seconds"] = time.perf_counter() - started
    (work / "ood.json").write_text(json.dumps(results, indent=2))
    section = markdown(results)
    print("\n" + section)
    for kind, result in results["runs"].items():
        for name, ok in result["checks"].items():
            print(f"{kind}: {'pass' if ok else 'FAIL'}  {name}")
    if arguments.markdown:
        Path(arguments.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.markdown).write_text(section)
    print(f"wrote {work / 'ood.json'}; {results['seconds'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
