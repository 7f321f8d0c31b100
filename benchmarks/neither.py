"""Teaching "neither" (#25): `catdog train --neither DIR`, measured with the commands a user runs.

On the shared photos, default preset:
- each species folder of not-pets-near is cut in halves by content (`halves`); a baseline run (`catdog train
  --data ../shared/data/dogs-vs-cats/train`) and a taught run (the same, `--neither` the taught halves, a folder of
  ten species folders) are trained;
- `catdog evaluate --run RUN --ood-data HELD` (the other halves): each species' share accepted, with and without
  the taught examples, and the validation photos refused;
- `catdog evaluate --run RUN --data ../shared/data/dogs-vs-cats-originals --ood-data ../shared/data/not-pets`:
  pets refused on the original-size photos and not-pets accepted, with and without;
- leave-one-species-out: for each species a run taught the taught halves of the nine others (`--neither` nine
  folders), evaluated on every photo of the species left out;
- the cost: `catdog train` wall time with and without (features cached; the taught examples' features computed in
  the taught run), the exported file's size (`catdog export`), and folder predict speed (`catdog predict --model
  FILE FOLDER`, images/s as predict reports them, the two files alternated, on the validation photos and the
  originals); and whether the exported file's decisions on the held halves equal evaluate's (through the cache).
Writes neither.json (every figure) and prints the BENCHMARKS.md section.

    python benchmarks/neither.py [--work /tmp/catdog-neither] [--reuse] [--rounds 2] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CATDOG, ROOT, machine_description, require_shared_data, run_timed  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
HALF_SEED = "neither-half-1"
# The acceptance checks (#25).
TARGETS = {"held_accepted": 0.05, "pets_kept": 0.985, "not_pets_slack": 0.005, "speed": 0.95}


def species_folders(near: Path) -> dict[str, list[Path]]:
    """not-pets-near's species and their photos, sorted."""
    return {folder.name: sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
            for folder in sorted(near.iterdir()) if folder.is_dir()}


def halves(paths: list[Path]) -> tuple[list[int], list[int]]:
    """(taught, held) positions: the photos ordered by a digest of their content, the first half taught."""
    keys = [hashlib.sha1(HALF_SEED.encode() + path.read_bytes()).hexdigest() for path in paths]
    order = sorted(range(len(paths)), key=lambda i: keys[i])
    middle = len(paths) // 2
    return sorted(order[:middle]), sorted(order[middle:])


def link_folder(folder: Path, photos: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        link = folder / photo.name
        if not link.is_symlink():
            link.symlink_to(photo)
    return folder


def train_run(name: str, work: Path, extra: list[str], reuse: bool) -> dict:
    run, record = work / name, work / f"{name}-train.json"
    if reuse and (run / "meta.json").is_file() and record.is_file():
        return json.loads(record.read_text())
    if run.exists():
        sys.exit(f"{run} exists: pass --reuse to use it, or remove it")
    seconds, output = run_timed(CATDOG + ["train", "--data", str(SHARED / "dogs-vs-cats" / "train"), "--out", str(run),
                                          "--no-progress"] + extra)
    result = {"seconds": seconds, "args": extra, "log": output}
    record.write_text(json.dumps(result, indent=2))
    print(f"{name}: catdog train in {seconds:.0f} s", flush=True)
    print("  " + "\n  ".join(line for line in output.splitlines() if line.startswith(("neither", "validation", "out-of"))), flush=True)
    return result


def evaluate(run: Path, name: str, extra: list[str], reuse: bool) -> dict:
    out = run / f"evaluation-{name}"
    if not (reuse and (out / "metrics.json").is_file()):
        seconds, _ = run_timed(CATDOG + ["evaluate", "--run", str(run), "--out", str(out)] + extra)
        print(f"{run.name}: evaluate {name} in {seconds:.0f} s", flush=True)
    return json.loads((out / "metrics.json").read_text())


def export(run: Path, reuse: bool) -> Path:
    if not (reuse and (run / "model.onnx").is_file()):
        run_timed(CATDOG + ["export", "--run", str(run)])
    return run / "model.onnx"


def predict_rate(model: Path, folder: Path, output: Path) -> tuple[float, list[dict]]:
    """`catdog predict --model FILE FOLDER`: the images/s it reports, and its rows."""
    _, text = run_timed(CATDOG + ["predict", "--model", str(model), str(folder), "--output", str(output), "--no-progress"])
    match = re.search(r"\(([\d.]+) images/s\)", text)
    with output.open(newline="") as handle:
        return (float(match.group(1)) if match else float("nan")), list(csv.DictReader(handle))


def file_vs_evaluate(work: Path) -> dict:
    """`catdog predict --model` (the taught run's file alone) against evaluate's ood_predictions.csv (through the
    feature cache, float16) on the held halves: shares accepted, photos decided alike, largest score differences."""
    rows = {Path(r["path"]).name: r for r in csv.DictReader((work / "predict-taught-held.csv").open())}
    cached = {Path(r["path"]).name: r for r in csv.DictReader((work / "taught" / "evaluation-near-held" / "ood_predictions.csv").open())}
    alike = sum(rows[name]["in_distribution"] == cached[name]["in_distribution"]
                and rows[name]["refused_by"] == cached[name]["refused_by"] for name in rows if name in cached)
    return {"file_accepted_share": sum(r["in_distribution"] == "true" for r in rows.values()) / len(rows),
            "evaluate_accepted_share": sum(r["in_distribution"] == "true" for r in cached.values()) / len(cached),
            "photos": len(rows), "decided_alike": alike,
            "ood_score_difference": max(abs(float(rows[n]["ood_score"]) - float(cached[n]["ood_score"])) for n in rows if n in cached),
            "neither_score_difference": max(abs(float(rows[n]["neither_score"]) - float(cached[n]["neither_score"])) for n in rows if n in cached),
            "file_refused_by": {why: sum(r["refused_by"] == why for r in rows.values()) for why in {r["refused_by"] for r in rows.values()}}}


def inference_milliseconds(models: dict[str, Path], folder: Path, rounds: int, photos: int = 48) -> dict:
    """The network alone, in process: `Predictor.score_batch` one photo at a time on the same decoded photos, the
    files alternated; the best round's milliseconds per photo for each."""
    import numpy as np
    from PIL import Image

    from catdog.runtime.model_file import load_model_file

    predictors = {name: load_model_file(path) for name, path in models.items()}
    first = next(iter(predictors.values()))
    arrays = [first.transform(Image.open(path).convert("RGB")) for path in sorted(folder.iterdir())[:photos]]
    best = {name: float("inf") for name in predictors}
    for _ in range(max(3, rounds * 2)):
        for name, predictor in predictors.items():
            predictor.score_batch(arrays[0][None])  # warm
            started = time.perf_counter()
            for array in arrays:
                predictor.score_batch(np.ascontiguousarray(array[None]))
            best[name] = min(best[name], 1000 * (time.perf_counter() - started) / len(arrays))
    return {**best, "ratio": best["baseline"] / best["taught"]}


def percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/catdog-neither", help="runs, link folders, predictions, neither.json")
    parser.add_argument("--reuse", action="store_true", help="use the runs and evaluations already in --work")
    parser.add_argument("--rounds", type=int, default=2, help="predict speed: rounds of each file on each folder")
    parser.add_argument("--skip-loso", action="store_true", help="leave the leave-one-species-out runs out")
    parser.add_argument("--markdown", default="", help="also write the section to this file")
    parser.add_argument("--report-only", action="store_true", help="print the section from --work's neither.json")
    arguments = parser.parse_args()
    if arguments.report_only:
        results = json.loads((Path(arguments.work) / "neither.json").read_text())
        results["file_vs_evaluate"] = file_vs_evaluate(Path(arguments.work))
        section = markdown(results)
        print(section)
        if arguments.markdown:
            Path(arguments.markdown).write_text(section)
        return
    require_shared_data()
    work = Path(arguments.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    near = species_folders(SHARED / "not-pets-near")
    taught_root, held_root = work / "near-taught", work / "near-held"
    counts = {}
    for name, paths in near.items():
        taught, held = halves(paths)
        link_folder(taught_root / name, [paths[i] for i in taught])
        link_folder(held_root / name, [paths[i] for i in held])
        counts[name] = {"photos": len(paths), "taught": len(taught), "held": len(held)}
    results = {"machine": machine_description(), "species": counts, "runs": {}}
    print(f"teaching neither: {results['machine']}; {sum(c['taught'] for c in counts.values())} taught examples", flush=True)

    runs = {"baseline": [], "taught": ["--neither", str(taught_root)]}
    for name, extra in runs.items():
        results["runs"][name] = {"train": train_run(name, work, extra, arguments.reuse)}
    results["runs"]["baseline-again"] = {"train": train_run("baseline-again", work, [], arguments.reuse)}  # warm timing
    for name in runs:
        run = work / name
        meta = json.loads((run / "meta.json").read_text())
        held = evaluate(run, "near-held", ["--ood-data", str(held_root)], arguments.reuse)
        originals = evaluate(run, "originals", ["--data", str(SHARED / "dogs-vs-cats-originals"), "--ood-data",
                                                str(SHARED / "not-pets")], arguments.reuse)
        entry = results["runs"][name]
        entry.update({"accuracy": meta["metrics"]["accuracy"], "log_loss": meta["metrics"]["log_loss"],
                      "neither_summary": meta.get("neither_summary"), "held": held["out_of_distribution"],
                      "originals": {key: originals[key] for key in ("accuracy", "log_loss", "count")},
                      "not_pets": originals["out_of_distribution"]})
    if not arguments.skip_loso:
        loso = {}
        for left_out in near:
            others = [str(taught_root / name) for name in near if name != left_out]
            name = f"loso-{left_out}"
            train = train_run(name, work, sum((["--neither", folder] for folder in others), []), arguments.reuse)
            found = evaluate(work / name, left_out, ["--ood-data", str(SHARED / "not-pets-near" / left_out)], arguments.reuse)
            summary = found["out_of_distribution"]
            loso[left_out] = {"accepted_share": summary["taught"]["other_accepted_share"],
                              "accepted_without_taught_share": summary["other_accepted_share"],
                              "validation_refused_share": summary["taught"]["validation_refused_share"],
                              "train_seconds": train["seconds"]}
        results["loso"] = loso

    models = {name: export(work / name, arguments.reuse) for name in runs}
    results["file_mb"] = {name: path.stat().st_size / 1e6 for name, path in models.items()}
    val_split = json.loads((work / "baseline" / "split.json").read_text())
    val_folder = link_folder(work / "validation-photos", [Path(val_split["root"]) / p for p in val_split["val"]])
    speed = {}
    for folder_name, folder in (("validation", val_folder), ("originals", SHARED / "dogs-vs-cats-originals")):
        rates = {name: [] for name in runs}
        for round_number in range(arguments.rounds):  # alternated, each file first in every other round
            for name in (list(models) if round_number % 2 == 0 else list(reversed(list(models)))):
                rate, _ = predict_rate(models[name], folder, work / f"predict-{name}-{folder_name}.csv")
                rates[name].append(rate)
        speed[folder_name] = {name: max(values) for name, values in rates.items()}
        speed[folder_name]["ratio"] = speed[folder_name]["taught"] / speed[folder_name]["baseline"]
        speed[folder_name]["rounds"] = rates
        print(f"predict {folder_name}: {speed[folder_name]}", flush=True)
    results["predict_images_per_second"] = speed
    results["inference_ms"] = inference_milliseconds(models, val_folder, arguments.rounds)
    print(f"inference alone: {results['inference_ms']}", flush=True)
    # The exported file alone decides as evaluate did (through the cache) on the held halves.
    predict_rate(models["taught"], held_root, work / "predict-taught-held.csv")
    results["file_vs_evaluate"] = file_vs_evaluate(work)
    results["seconds"] = time.perf_counter() - started
    (work / "neither.json").write_text(json.dumps(results, indent=2))
    section = markdown(results)
    print("\n" + section)
    if arguments.markdown:
        Path(arguments.markdown).write_text(section)


def markdown(results: dict) -> str:
    base, taught = results["runs"]["baseline"], results["runs"]["taught"]
    species = list(results["species"])
    lines = ["## Teaching neither (`python benchmarks/neither.py`)", "",
             f"Issue 25, measured with the commands a user runs ({results['machine']}): each species folder of "
             "`not-pets-near` cut in halves by content; `catdog train --data ../shared/data/dogs-vs-cats/train` (default "
             "preset) without and with `--neither` the taught halves "
             f"({sum(c['taught'] for c in results['species'].values())} photos); `catdog evaluate --ood-data` the other "
             "halves, and `--data ../shared/data/dogs-vs-cats-originals --ood-data ../shared/data/not-pets`.", "",
             "| species | photos (taught / held) | held half accepted without | with --neither | leave-one-species-out: accepted without | with the other nine |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    loso = results.get("loso", {})
    for name in species:
        count = results["species"][name]
        lines.append(f"| {name} | {count['taught']} / {count['held']} | {percent(base['held']['groups'][name]['accepted_share'])} | "
                     f"{percent(taught['held']['taught']['groups'][name]['accepted_share'])} | "
                     f"{percent(loso.get(name, {}).get('accepted_without_taught_share'))} | {percent(loso.get(name, {}).get('accepted_share'))} |")
    loso_all = loso_without = None
    if loso:  # every photo of every species, each measured by the run that was never shown its species
        photos = {name: results["species"][name]["photos"] for name in loso}
        loso_all = sum(loso[name]["accepted_share"] * photos[name] for name in loso) / sum(photos.values())
        loso_without = sum(loso[name]["accepted_without_taught_share"] * photos[name] for name in loso) / sum(photos.values())
    lines.append(f"| all | {sum(c['taught'] for c in results['species'].values())} / {sum(c['held'] for c in results['species'].values())} | "
                 f"{percent(base['held']['other_accepted_share'])} | {percent(taught['held']['taught']['other_accepted_share'])} | "
                 f"{percent(loso_without)} | {percent(loso_all)} |")
    pets_val_base, pets_val = base["held"]["validation_refused_share"], taught["held"]["taught"]["validation_refused_share"]
    pets_orig_base, pets_orig = base["not_pets"]["validation_refused_share"], taught["not_pets"]["taught"]["validation_refused_share"]
    not_pets_base, not_pets = base["not_pets"]["other_accepted_share"], taught["not_pets"]["taught"]["other_accepted_share"]
    train_base = results["runs"]["baseline-again"]["train"]["seconds"]
    speed = results["predict_images_per_second"]
    lines += ["", "| | without --neither | with --neither |", "| --- | ---: | ---: |",
              f"| validation accuracy / log loss | {base['accuracy']:.2%} / {base['log_loss']:.4f} | {taught['accuracy']:.2%} / {taught['log_loss']:.4f} |",
              f"| validation photos refused ({base['held']['validation_photos']:,}) | {pets_val_base:.2%} | {pets_val:.2%} |",
              f"| dogs-vs-cats-originals refused ({base['not_pets']['validation_photos']:,}) | {pets_orig_base:.2%} | {pets_orig:.2%} |",
              f"| originals accuracy / log loss | {base['originals']['accuracy']:.2%} / {base['originals']['log_loss']:.4f} | "
              f"{taught['originals']['accuracy']:.2%} / {taught['originals']['log_loss']:.4f} |",
              f"| not-pets accepted ({base['not_pets']['other_photos']:,}) | {not_pets_base:.2%} | {not_pets:.2%} |",
              f"| `catdog train` wall time, features cached (s) | {train_base:.0f} | {taught['train']['seconds']:.0f} |",
              f"| exported file (MB) | {results['file_mb']['baseline']:.1f} | {results['file_mb']['taught']:.1f} |"]
    for folder in ("validation", "originals"):
        lines.append(f"| folder predict, {folder} (images/s, best of {len(speed[folder]['rounds']['baseline'])}) | "
                     f"{speed[folder]['baseline']:.1f} | {speed[folder]['taught']:.1f} ({speed[folder]['ratio']:.3f}x) |")
    inference = results.get("inference_ms")
    if inference:
        lines.append(f"| the network alone, one photo at a time (ms) | {inference['baseline']:.2f} | {inference['taught']:.2f} "
                     f"({inference['ratio']:.3f}x the speed) |")
    held_worst = max(taught["held"]["taught"]["groups"][name]["accepted_share"] for name in species)
    checks = {f"every species' held half accepted <= {TARGETS['held_accepted']:.0%} (worst {held_worst:.1%})": held_worst <= TARGETS["held_accepted"],
              f"pets kept >= {TARGETS['pets_kept']:.1%} on validation ({1 - pets_val:.2%}) and originals ({1 - pets_orig:.2%})":
                  min(1 - pets_val, 1 - pets_orig) >= TARGETS["pets_kept"],
              f"not-pets accepted <= without + 0.5 points ({not_pets:.2%} vs {not_pets_base:.2%})": not_pets <= not_pets_base + TARGETS["not_pets_slack"],
              f"folder predict >= {TARGETS['speed']}x (validation {speed['validation']['ratio']:.3f}x, originals {speed['originals']['ratio']:.3f}x)":
                  min(speed["validation"]["ratio"], speed["originals"]["ratio"]) >= TARGETS["speed"],
              "leave-one-species-out measured for every species": len(loso) == len(species)}
    lines += ["", "Checks: " + "; ".join(f"{'pass' if ok else 'FAIL'}: {name}" for name, ok in checks.items()) + "."]
    summary = taught.get("neither_summary") or {}
    if summary:
        held = summary.get("held_out", {})
        lines += ["", f"The taught run's log: {summary['photos']} examples, head threshold {summary['threshold']:.4f}, bank "
                  f"margin {summary['margin']:.4f} (k={summary['k']}); "
                  f"its training-time estimate on a held-out fifth of the examples: {percent(held.get('refused_share'))} refused "
                  f"({percent(held.get('refused_without_taught_share'))} by the automatic score alone)."]
    check = results.get("file_vs_evaluate", {})
    if check:
        lines += ["", f"`catdog predict --model` (the taught run's model.onnx alone) on the held halves accepts "
                  f"{percent(check['file_accepted_share'])}, evaluate through the feature cache {percent(check['evaluate_accepted_share'])}; "
                  + (f"{check['decided_alike']} of {check['photos']} photos decided alike, with the same reason (scores within "
                     f"{check['ood_score_difference']:.1e}, the head's within {check['neither_score_difference']:.1e}: the cache "
                     "keeps features in float16); " if "decided_alike" in check else "")
                  + "its `refused_by` column: " + ", ".join(f"{count} {why or 'empty (accepted)'}" for why, count in sorted(check["file_refused_by"].items()))
                  + " (the taught reason is given whenever the examples refuse a photo, also where the score would have)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
