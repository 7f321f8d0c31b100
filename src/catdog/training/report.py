"""`catdog report`: one self-contained HTML page about a trained run (every image embedded, nothing fetched).

It reads what the run and `catdog evaluate` already wrote (config.json, split.json, history.csv, the evaluation's
metrics.json, predictions.csv, roc.png and reliability.png) and runs evaluate first only when that evaluation is
missing, older than the calibration figures, or of other data. The only inference of its own is Grad-CAM on the
few most confidently wrong photos, and the label-error search when no label_issues.csv is at hand (seconds once
the training photos' features are cached).

Intervals: accuracy's is Wilson's score interval (scipy); log loss, macro F1, ROC AUC and ECE get percentile
bootstrap intervals over the scored photos (scipy.stats.bootstrap, 1,000 resamples, seeded).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from catdog.training.config import ReportConfig
from catdog.runtime.runs import RunMeta, check_not_pickle, read_meta
from catdog.training.backends import load_run_predictor
from catdog.runtime.explain import explain_photo
from catdog.runtime.files import write_text_atomic
from catdog.runtime.images import ImageLoadError, load_image

SECTIONS = {  # id: title, in page order (the browser test checks each one)
    "summary": "Summary",
    "training-curves": "Training curves",
    "confusion-matrix": "Confusion matrix",
    "roc": "ROC curve",
    "calibration": "Calibration",
    "damaged": "Damaged photos",
    "neither": "Saying neither: photos unlike the training photos",
    "per-class": "Per-class precision, recall and F1",
    "samples": "Sample predictions",
    "mistakes": "Most confidently wrong, with Grad-CAM",
    "label-issues": "Likely label errors in the training data",
}
THUMBNAIL_SIDE = 200


@dataclass
class Scored:
    """evaluate's predictions.csv: one row per scored photo."""

    relative_paths: list[str]
    paths: list[Path]
    labels: np.ndarray
    probabilities: np.ndarray


# ---------------------------------------------------------------- inputs


def evaluation_folder(run_dir: Path, config: ReportConfig) -> Path:
    """Where evaluate's results for this data live: <run>/evaluation for the run's own split (evaluate's default)."""
    if not config.data:
        return run_dir / "evaluation"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(config.data).resolve().name or "data")
    return run_dir / f"evaluation-{slug}"


def current_evaluation(run_dir: Path, config: ReportConfig, log=print) -> tuple[Path, dict, object]:
    """The evaluation of this run on this data (folder, metrics, images), run now if missing or stale."""
    from catdog.training.evaluate import EvaluateConfig, evaluate_run, evaluation_images

    images, description = evaluation_images(run_dir, config.data, config.layout)
    folder = evaluation_folder(run_dir, config)
    metrics_path = folder / "metrics.json"
    needed = ("predictions.csv", "roc.png", "reliability.png")
    if metrics_path.is_file() and all((folder / name).is_file() for name in needed):
        metrics = json.loads(metrics_path.read_text())
        wanted_ood = not config.ood_data or metrics.get("out_of_distribution", {}).get("data") == str(Path(config.ood_data))
        if metrics.get("data") == description and "ece" in metrics and wanted_ood:
            log(f"report: reusing the evaluation in {folder}")
            return folder, metrics, images
    log(f"report: no current evaluation in {folder}; running catdog evaluate")
    metrics = evaluate_run(EvaluateConfig(run=str(run_dir), data=config.data, out=str(folder), layout=config.layout,
                                          device=config.device, ood_data=config.ood_data), log=log)
    return folder, metrics, images


def read_predictions(path: Path, root: Path, class_names: list[str]) -> Scored:
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    columns = [f"p_{name}" for name in class_names]
    relative = [row["path"] for row in rows]
    labels = np.array([class_names.index(row["label"]) for row in rows], dtype=np.int64)
    probabilities = np.array([[float(row[c]) for c in columns] for row in rows], dtype=np.float64).reshape(-1, len(class_names))
    return Scored(relative, [resolve_photo(root, p) for p in relative], labels, probabilities)


def resolve_photo(root: Path, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else root / candidate


def read_history(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as stream:
        return [{key: float(value) for key, value in row.items() if value not in ("", None)} for row in csv.DictReader(stream)]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------- statistics


def wilson_interval(correct: int, total: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    if total == 0:
        return float("nan"), float("nan")
    interval = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def bootstrap_interval(statistic, count: int, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval over `count` photos resampled with replacement; `statistic` maps a 2-D array
    of index rows (one resample per row) to one value per row."""
    from scipy.stats import bootstrap

    if count < 2:
        return float("nan"), float("nan")

    def vectorised(indices, axis=-1):
        values = statistic(np.atleast_2d(indices))
        return values if np.ndim(indices) > 1 else values[0]

    result = bootstrap((np.arange(count),), vectorised, n_resamples=resamples, vectorized=True, method="percentile",
                       confidence_level=0.95, batch=100, random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def resampled_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Each metric as a function of index rows (one resample per row), computed for all rows at once: scikit-learn's
    functions give the same values but cost milliseconds of argument checking per call, minutes for 1,000
    resamples on a busy machine. tests/test_report.py checks each against scikit-learn."""
    from scipy.stats import rankdata

    from catdog.training.calibration import expected_calibration_error

    classes = probabilities.shape[1]
    predictions = probabilities.argmax(axis=1)
    truth_probability = np.clip(probabilities[np.arange(len(labels)), labels], 1e-15, 1.0)

    def log_loss(rows):
        return -np.log(truth_probability[rows]).mean(axis=1)

    def macro_f1(rows):  # scikit-learn's average="macro", zero_division=0, over every class
        truth, guess = labels[rows], predictions[rows]
        scores = []
        for c in range(classes):
            true_positive = ((truth == c) & (guess == c)).sum(axis=1)
            wrong = ((truth == c) != (guess == c)).sum(axis=1)  # false positives + false negatives
            scores.append(np.where(true_positive > 0, 2 * true_positive / np.maximum(2 * true_positive + wrong, 1), 0.0))
        return np.mean(scores, axis=0)

    def one_vs_rest_auc(scores, positive):  # Mann-Whitney: the chance a positive outranks a negative, ties half
        positives = positive.sum(axis=1)
        negatives = positive.shape[1] - positives
        rank_sum = (rankdata(scores, axis=1) * positive).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)

    def roc_auc(rows):  # binary: of the second class; more classes: one-vs-rest macro (as metrics.py)
        if classes == 2:
            return one_vs_rest_auc(probabilities[rows, 1], labels[rows] == 1)
        return np.mean([one_vs_rest_auc(probabilities[rows, c], labels[rows] == c) for c in range(classes)], axis=0)

    def ece(rows):
        return np.array([expected_calibration_error(labels[row], probabilities[row]) for row in rows])

    return {"log_loss": log_loss, "macro_f1": macro_f1, "roc_auc": roc_auc, "ece": ece}


def metric_intervals(scored: Scored, resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    labels, probabilities = scored.labels, scored.probabilities
    count = len(labels)
    correct = int((probabilities.argmax(axis=1) == labels).sum())
    intervals = {"accuracy": wilson_interval(correct, count)}
    for name, statistic in resampled_metrics(labels, probabilities).items():
        if name == "roc_auc" and len(np.unique(labels)) < probabilities.shape[1]:
            continue  # no AUC without every class
        intervals[name] = bootstrap_interval(statistic, count, resamples, seed)
    return intervals


def most_confused_pairs(matrix: list[list[int]], class_names: list[str]) -> list[tuple[str, str, int]]:
    """(true, predicted, count) of every off-diagonal cell with photos, the largest first."""
    pairs = [(class_names[t], class_names[p], int(matrix[t][p]))
             for t in range(len(matrix)) for p in range(len(matrix)) if t != p and matrix[t][p]]
    return sorted(pairs, key=lambda pair: -pair[2])


# ---------------------------------------------------------------- HTML pieces


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(path: Path, side: int = THUMBNAIL_SIDE) -> str | None:
    try:
        photo = load_image(path, draft_size=side)
    except ImageLoadError:
        return None
    photo.thumbnail((side, side))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=85)
    return data_uri(buffer.getvalue(), "image/jpeg")


def figure_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return data_uri(buffer.getvalue(), "image/png")


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def probability_text(probabilities: np.ndarray, class_names: list[str]) -> str:
    return " · ".join(f"{escape(name)} {p:.3f}" for name, p in zip(class_names, probabilities))


def photo_card(uri: str | None, name: str, caption: str, css_class: str = "") -> str:
    picture = f'<img src="{uri}" alt="{escape(name)}">' if uri else '<div class="unreadable">unreadable</div>'
    return (f'<figure class="photo {css_class}">{picture}<figcaption><b class="file">{escape(name)}</b><br>{caption}'
            "</figcaption></figure>")


def table(header: list[str], rows: list[list], css_class: str = "") -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def interval_text(value: float, interval: tuple[float, float] | None, digits: int = 4) -> str:
    if interval is None or not all(np.isfinite(interval)):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} <small>(95% interval {interval[0]:.{digits}f} – {interval[1]:.{digits}f})</small>"


# ---------------------------------------------------------------- sections


def summary_section(run_dir: Path, meta: RunMeta, train_config: dict, split: dict, history: list[dict], metrics: dict,
                    intervals: dict, evaluation: Path) -> str:
    trained = datetime.fromtimestamp((run_dir / "meta.json").stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    loop_seconds = sum(row.get("seconds", 0.0) for row in history)
    rows = [
        ["run", escape(run_dir.resolve())],
        ["model", f"{escape(meta.model_name)} at {meta.preprocess.input_size} px; classes {escape(', '.join(meta.class_names))}"],
        ["strategy", escape(meta.strategy) + (f", preset {escape(train_config['preset'])}" if train_config.get("preset") else "")
         + (", mirror-image averaging" if meta.tta else "")],
        ["training data", escape(source_text(split.get("data", "?"))) + (f": {len(split.get('train', []))} training, {len(split.get('val', []))} validation photos" if split else "")],
        ["time", f"trained {trained}; {len(history)} epochs, {loop_seconds:.1f} s in the training loop"],
        ["evaluated on", f"{escape(metrics.get('data', '?'))} ({metrics.get('count', 0)} photos scored; {escape(evaluation)})"],
        ["accuracy", interval_text(metrics["accuracy"], intervals.get("accuracy")) + " <small>Wilson</small>"],
        ["log loss", interval_text(metrics["log_loss"], intervals.get("log_loss")) + " <small>bootstrap</small>"],
        ["macro F1", interval_text(metrics["macro_f1"], intervals.get("macro_f1")) + " <small>bootstrap</small>"],
    ]
    if "roc_auc" in metrics:
        rows.append(["ROC AUC", interval_text(metrics["roc_auc"], intervals.get("roc_auc")) + " <small>bootstrap</small>"])
    if "ece" in metrics:
        rows.append(["ECE", interval_text(metrics["ece"], intervals.get("ece")) + f" <small>bootstrap; temperature {meta.temperature:.3f}</small>"])
    return table(["", ""], rows, "summary")


def training_curves_section(history: list[dict]) -> str:
    if not history:
        return "<p>No history.csv in the run.</p>"
    from catdog.training.evaluate import _pyplot

    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("train_loss", "training"), ("val_loss", "validation")):
        loss_axes.plot(epochs, [row.get(key, np.nan) for row in history], marker=".", label=label)
    for key, label in (("train_accuracy", "training"), ("val_accuracy", "validation")):
        accuracy_axes.plot(epochs, [row.get(key, np.nan) for row in history], marker=".", label=label)
    loss_axes.set_yscale("log")
    for axes, name in ((loss_axes, "loss (cross-entropy)"), (accuracy_axes, "accuracy")):
        axes.set_xlabel("epoch")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    uri = figure_uri(figure)
    plt.close(figure)
    best = min(history, key=lambda row: row.get("val_loss", np.inf))
    return (f'<img class="plot" src="{uri}" alt="training curves">'
            f"<p>Best validation loss {best.get('val_loss', np.nan):.4f} at epoch {int(best['epoch'])} (the weights kept).</p>")


def confusion_section(metrics: dict, class_names: list[str]) -> str:
    matrix = metrics["confusion_matrix"]
    rows = []
    for truth, name in enumerate(class_names):
        total = max(sum(matrix[truth]), 1)
        cells = [f"<b>{escape(name)}</b>"]
        for guess in range(len(class_names)):
            share = matrix[truth][guess] / total
            style = f"background: rgba(47,111,237,{0.08 + 0.6 * share:.2f})"
            cells.append(f'<span style="{style}" class="cell">{matrix[truth][guess]} <small>({100 * share:.1f}%)</small></span>')
        rows.append(cells)
    return "<p>Rows: true class; columns: predicted class.</p>" + table(["true \\ predicted"] + class_names, rows, "confusion")


def image_file_section(path: Path, alt: str, note: str = "") -> str:
    if not path.is_file():
        return f"<p>{escape(path.name)} is missing in {escape(path.parent)}.</p>"
    return f'<img class="plot" src="{data_uri(path.read_bytes(), "image/png")}" alt="{escape(alt)}">{note}'


def calibration_section(evaluation: Path, metrics: dict, temperature: float) -> str:
    note = ""
    if "ece" in metrics:
        note = (f"<p>Expected calibration error (15 equal-width confidence bins): {metrics['ece_before_temperature']:.4f} "
                f"before the temperature, {metrics['ece']:.4f} after it (T = {temperature:.3f}).</p>")
    return image_file_section(evaluation / "reliability.png", "reliability diagrams before and after the temperature", note)


def damaged_photos_evaluation(run_dir: Path, config: ReportConfig, evaluation: Path, log=print) -> dict:
    """The evaluation's metrics with its damaged-photos table, added now (`evaluate.add_corruptions`)."""
    from catdog.training.evaluate import EvaluateConfig, add_corruptions

    log("report: the evaluation has no damaged-photos table; running evaluate --corruptions")
    return add_corruptions(EvaluateConfig(run=str(run_dir), data=config.data, out=str(evaluation), layout=config.layout,
                                          device=config.device, corruptions=True), log=log)


def source_text(data) -> str:
    """split.json's data: one source, or several (a list) joined."""
    return " + ".join(str(source) for source in data) if isinstance(data, list) else str(data)


def neither_section(evaluation: Path, metrics: dict, meta: RunMeta) -> str:
    """evaluate --ood-data's figures: how well the run tells its kind of photo from others, and the histograms;
    for a run taught examples of "neither", what they refused beside the automatic score, and why."""
    summary = metrics.get("out_of_distribution")
    taught = taught_neither_text(metrics, meta)
    if not summary:
        if meta.ood_threshold is None:
            return "<p>This run has no out-of-distribution score (trained before catdog 0.5).</p>"
        return (f"<p>The run says \"neither\" above an out-of-distribution score of {meta.ood_threshold:.4f}, "
                f"which keeps {meta.ood_keep or 0.99:.0%} of its validation photos. Not measured against other photos: "
                "<code>catdog report --ood-data DIR</code> with a folder of photos showing none of the classes.</p>" + taught)
    with_taught = "taught" in summary
    rows = [["all", summary["other_photos"], f"{summary['other_accepted_share']:.2%}"]
            + ([f"{summary['taught']['other_accepted_share']:.2%}"] if with_taught else [])]
    rows += [[escape(name), group["photos"], f"{group['accepted_share']:.2%}"]
             + ([f"{summary['taught']['groups'][name]['accepted_share']:.2%}"] if with_taught else [])
             for name, group in summary["groups"].items()]
    header = ["folder", "photos", "accepted by the score alone" if with_taught else "accepted"]
    if with_taught:
        header.append("accepted with the taught examples")
        found = summary["taught"]
        examples = ", ".join(f"{escape(name)} ({count})" for name, count in found["nearest_examples"][:5])
        taught += (f"<p>With the {found['examples']} taught examples {found['other_refused_by_taught']} of these photos are "
                   f"refused as \"like a taught neither example\" ({found['other_refused_by_taught_only']} of them accepted "
                   f"by the score alone), and {found['validation_refused_share']:.2%} of the evaluated photos in all"
                   + (f"; the examples that refused the most: {examples}" if examples else "")
                   + ". Each photo's reason and example: <code>ood_predictions.csv</code> in the evaluation folder.</p>")
    return (f"<p>Against {summary['other_photos']} photos of <code>{escape(summary['data'])}</code>: AUROC "
            f"{summary['auroc']:.4f}; at the run's threshold ({summary['threshold']:.4f}) "
            f"{summary['validation_refused_share']:.2%} of the evaluated photos are refused and these shares of the "
            "other photos accepted:</p>" + table(header, rows) + taught
            + image_file_section(evaluation / "ood_scores.png", "histograms of the out-of-distribution scores"))


def taught_neither_text(metrics: dict, meta: RunMeta) -> str:
    """The run's taught "neither" examples: how many, and how many evaluated photos they refused (and which, with
    the example each is like)."""
    if not meta.taught_neither:
        return ""
    entry = metrics.get("taught_neither")
    text = (f"<p>The run was taught {meta.taught_neither} examples of \"neither\" (<code>--neither</code>): a photo "
            f"their head scores above {meta.neither_threshold:.4f} (chosen to keep {meta.neither_keep:.1%} of the "
            "validation photos), or nearer one of them than any validation photo, is refused too.")
    if entry:
        text += (f" Of the {entry['photos']} evaluated photos they refuse {entry['refused_by_taught_share']:.2%} "
                 f"(the score {entry['refused_by_score_share']:.2%}; both together {entry['refused_share']:.2%})")
        listed = entry["refused_by_taught"][:8]
        if listed:
            text += ": " + ", ".join(f"<code>{escape(row['path'])}</code> like <code>{escape(row['nearest_neither'])}</code>"
                                     for row in listed) + ("..." if len(entry["refused_by_taught"]) > 8 else "")
        text += "."
    return text + "</p>"


def damaged_photos_section(evaluation: Path, metrics: dict) -> str:
    """evaluate --corruptions' table: each kind of damage at its two severities, and its plot."""
    table_data = metrics.get("corruptions")
    if not table_data:
        return ("<p>Not measured; <code>catdog evaluate --run RUN --corruptions</code> (or a report without "
                "<code>--no-corruptions</code>) scores the photos under common damage.</p>")
    severities = table_data.get("severities", {})
    rows = []
    for row in table_data["conditions"]:
        unit = severities.get(row["kind"], {}).get("unit", "")
        rows.append([f"<b>{escape(row['kind'])}</b>", escape(row["level"]), f"{row['severity']:g} <small>{escape(unit)}</small>",
                     f"{row['accuracy']:.4f}", f"{row['log_loss']:.4f}"])
    clean = table_data["clean"]
    summaries = "".join(
        f"<li>{level}: mean accuracy {summary['mean_accuracy']:.4f}, lowest {summary['min_accuracy']:.4f} "
        f"({escape(summary['worst_kind'])}), mean log loss {summary['mean_log_loss']:.4f}</li>"
        for level in ("strong", "mild") if (summary := table_data.get(f"{level}_summary")))
    text = (f"<p>The {table_data['photos']} evaluated photos under common damage (after ImageNet-C; "
            "<code>catdog/training/corruptions.py</code> states each severity and why), each photo's damage seeded by its "
            f"content; mirror view: {escape(table_data['mirror_view'])}. The same photos clean: accuracy "
            f"{clean['accuracy']:.4f}, log loss {clean['log_loss']:.4f}.</p><ul>{summaries}</ul>")
    return (text + table(["damage", "severity", "setting", "accuracy", "log loss"], rows, "damaged")
            + image_file_section(evaluation / "corruptions.png", "accuracy and log loss under each kind of damage"))


def per_class_section(metrics: dict, class_names: list[str]) -> str:
    rows = [[f"<b>{escape(name)}</b>", f"{values['precision']:.4f}", f"{values['recall']:.4f}", f"{values['f1']:.4f}", values["support"]]
            for name, values in metrics["per_class"].items()]
    pairs = most_confused_pairs(metrics["confusion_matrix"], class_names)
    confused = (table(["true", "predicted as", "photos"], [[escape(t), escape(p), n] for t, p, n in pairs[:10]], "confused")
                if pairs else "<p>No class was confused with another.</p>")
    return table(["class", "precision", "recall", "F1", "support"], rows, "per-class") + "<h3>Most-confused pairs</h3>" + confused


def samples_section(scored: Scored, class_names: list[str], count: int, seed: int) -> str:
    if not len(scored.labels):
        return "<p>No photos were scored.</p>"
    chosen = np.sort(np.random.default_rng(seed).choice(len(scored.labels), size=min(count, len(scored.labels)), replace=False))
    cards = []
    for index in chosen:
        probabilities = scored.probabilities[index]
        guess = int(probabilities.argmax())
        verdict = "right" if guess == scored.labels[index] else "wrong"
        caption = (f"true {escape(class_names[scored.labels[index]])}, predicted {escape(class_names[guess])}<br>"
                   + probability_text(probabilities, class_names))
        cards.append(photo_card(thumbnail_uri(scored.paths[index]), scored.relative_paths[index], caption, verdict))
    return f'<div class="grid">{"".join(cards)}</div>'


def mistakes_section(scored: Scored, class_names: list[str], count: int, run_dir: Path, device: str) -> str:
    from catdog.training.evaluate import most_confident_mistakes
    mistakes = most_confident_mistakes(scored.labels, scored.probabilities, count)
    if not len(mistakes):
        return "<p>No photo was misclassified.</p>"
    predictor = load_run_predictor(str(run_dir), "auto", device)
    cards = []
    for index in mistakes:
        probabilities = scored.probabilities[index]
        guess = int(probabilities.argmax())
        caption = (f"true {escape(class_names[scored.labels[index]])}, predicted {escape(class_names[guess])}<br>"
                   + probability_text(probabilities, class_names))
        try:
            overlay = explain_photo(predictor, load_image(scored.paths[index])).overlay_png(max_side=THUMBNAIL_SIDE + 40)
            uri = data_uri(overlay, "image/png")
        except ImageLoadError:
            uri = None
        cards.append(photo_card(uri, scored.relative_paths[index], caption, "wrong"))
    return ("<p>The photos the model got wrong with the most confidence, the heatmap of the class it predicted over "
            "each (Grad-CAM: red is the evidence it used).</p>" + f'<div class="grid">{"".join(cards)}</div>')


def read_label_issues(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def label_issue_rows(run_dir: Path, config: ReportConfig, split: dict, train_config: dict, log=print) -> tuple[list[dict], str]:
    """label_issues.csv rows (most suspicious first) and where they came from; found now when none is at hand."""
    candidates = [Path(config.label_issues)] if config.label_issues else [run_dir / "label_issues.csv"]
    for candidate in candidates:
        if candidate.is_file():
            return read_label_issues(candidate), f"from {candidate}"
    if config.label_issues:
        raise FileNotFoundError(f"{config.label_issues}: no such label issues file")
    if not config.find_label_issues or not split:
        return [], ""
    if isinstance(split.get("data"), list):  # the search reads one data set; a merged run's sources are several
        return [], "not searched: the run merges several data sources; run `catdog data issues` on each"
    from catdog.runtime.data import DataError
    from catdog.training.label_issues import find_label_issues, write_label_issues_csv

    preset = train_config.get("preset", "default")
    log(f"report: looking for label errors in {split['data']} (out-of-fold heads on the {preset} preset's features)")
    try:
        result = find_label_issues(split["data"], preset=preset, layout=split.get("layout", "auto"), device=config.device)
    except DataError as error:  # e.g. a class with a single photo: the rest of the report is still worth having
        log(f"report: no label-error search: {error}")
        return [], f"not searched: {error}"
    target = run_dir / "label_issues.csv"
    write_label_issues_csv(target, result.rows)  # the next report (and `train --exclude`) reuse it
    return read_label_issues(target), f"found now in {result.seconds:.1f} s and saved as {target}"


def label_issues_section(rows: list[dict], source: str, root: Path, shown: int) -> str:
    if not rows:
        why = escape(source) if source else "no label_issues.csv and the search was switched off"
        return f"<p>Not searched ({why}); <code>catdog data issues DATA</code> writes label_issues.csv.</p>"
    flagged = [row for row in rows if row.get("label_issue", "1") in ("1", "True", "true")]
    cards = []
    for row in flagged[:shown]:
        caption = (f"labelled {escape(row['given_label'])}, looks like {escape(row['suggested_label'])}<br>"
                   f"P({escape(row['given_label'])}) {float(row['given_label_probability']):.3f} · "
                   f"P({escape(row['suggested_label'])}) ≈ {1 - float(row['given_label_probability']):.3f}"
                   if row["given_label"] != row["suggested_label"] else
                   f"labelled {escape(row['given_label'])}<br>P({escape(row['given_label'])}) {float(row['given_label_probability']):.3f}")
        cards.append(photo_card(thumbnail_uri(resolve_photo(root, row["path"])), row["path"], caption, "issue"))
    text = (f"<p>{len(flagged)} of {len(rows)} photos flagged by confident learning (out-of-fold probabilities; "
            f"{escape(source)}); the {len(cards)} the model believes least are shown. "
            "<code>catdog train --exclude label_issues.csv</code> leaves the flagged ones out.</p>")
    return text + (f'<div class="grid">{"".join(cards)}</div>' if cards else "<p>No likely label errors.</p>")


STYLE = """
:root { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; background: #f5f6f8; }
main { max-width: 1100px; margin: 1.5rem auto; padding: 0 1rem; }
section { background: #fff; border-radius: 10px; padding: .6rem 1.2rem 1rem; margin: 1rem 0; }
h1 { margin-bottom: .2rem; } h2 { font-size: 1.25rem; } h3 { font-size: 1rem; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { padding: .25rem .7rem; border-bottom: 1px solid #e3e6ec; text-align: left; }
table.summary td:first-child { font-weight: 600; white-space: nowrap; }
.cell { display: inline-block; padding: .2rem .5rem; border-radius: 4px; }
img.plot { max-width: 100%; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: .8rem; }
figure.photo { margin: 0; font-size: .78rem; } figure.photo img { width: 100%; border-radius: 6px; }
figure.wrong img { outline: 3px solid #b3261e; } figure.issue img { outline: 3px solid #d98c00; }
.file { word-break: break-all; } .unreadable { height: 120px; background: #eee; display: grid; place-items: center; }
nav a { margin-right: .8rem; font-size: .9rem; }
"""


def render_page(title: str, sections: dict[str, str], footer: str) -> str:
    navigation = "".join(f'<a href="#{key}">{escape(SECTIONS[key])}</a>' for key in sections)
    body = "".join(f'<section id="{key}"><h2>{escape(SECTIONS[key])}</h2>{content}</section>' for key, content in sections.items())
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body><main><h1>{escape(title)}</h1><nav>{navigation}</nav>{body}<p><small>{footer}</small></p></main></body></html>\n")


# ---------------------------------------------------------------- the command


def build_report(config: ReportConfig, log=print) -> Path:
    """Write the report; return its path."""
    from catdog.runtime.version import __version__

    started = time.perf_counter()
    run_dir = Path(config.run)
    check_not_pickle(run_dir)
    meta = read_meta(run_dir)
    train_config, split = read_json(run_dir / "config.json"), read_json(run_dir / "split.json")
    evaluation, metrics, images = current_evaluation(run_dir, config, log)
    if config.corruptions and "corruptions" not in metrics:
        metrics = damaged_photos_evaluation(run_dir, config, evaluation, log)
    class_names = list(meta.class_names)
    scored = read_predictions(evaluation / "predictions.csv", Path(images.root), class_names)
    history = read_history(run_dir)
    intervals = metric_intervals(scored, config.bootstrap, config.seed)
    issues, issues_source = label_issue_rows(run_dir, config, split, train_config, log)
    issues_root = Path(split.get("root", images.root))
    sections = {
        "summary": summary_section(run_dir, meta, train_config, split, history, metrics, intervals, evaluation),
        "training-curves": training_curves_section(history),
        "confusion-matrix": confusion_section(metrics, class_names),
        "roc": image_file_section(evaluation / "roc.png", "ROC curve"),
        "calibration": calibration_section(evaluation, metrics, meta.temperature),
        "damaged": damaged_photos_section(evaluation, metrics),
        "neither": neither_section(evaluation, metrics, meta),
        "per-class": per_class_section(metrics, class_names),
        "samples": samples_section(scored, class_names, config.samples, config.seed),
        "mistakes": mistakes_section(scored, class_names, config.mistakes, run_dir, config.device),
        "label-issues": label_issues_section(issues, issues_source, issues_root, config.issues_shown),
    }
    footer = f"catdog {__version__} report, written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}."
    output = Path(config.output)
    write_text_atomic(output, render_page(f"catdog report: {run_dir.resolve().name}", sections, footer))
    log(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
    return output
