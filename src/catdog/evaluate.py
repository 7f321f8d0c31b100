"""`catdog evaluate`: metrics and plots for a trained run on labelled data.

When the data is the run's own training data, only its validation split (from split.json) is evaluated: scoring
the images the model trained on would report a flattering, meaningless figure.

A run trained with the head strategy has the untouched pretrained backbone, so its scores are its head applied to
that backbone's features, which training cached for every photo it saw: evaluating such a run right after
training reads them instead of running the network again (seconds instead of minutes), and caches what is new.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catdog.calibration import ReliabilityCurve, plot_reliability_diagrams, reliability_curve, remove_temperature
from catdog.checkpoint import load_model
from catdog.ood import OOD_FILE, KnnScorer, out_of_distribution_summary, plot_out_of_distribution_scores
from catdog.runs import RunError, check_not_pickle, read_meta
from catdog.config import option
from catdog.data import DataError, describe_left_out, discover, find_image_files, relative_to_root
from catdog.devices import resolve_device
from catdog.files import write_csv_atomic, write_json_atomic, write_with_atomic
from catdog.metrics import classification_metrics
from catdog.backends import load_run_predictor
from catdog.predict import PredictionOutcome


@dataclass
class EvaluateConfig:
    run: str = option("", "run directory made by `catdog train`")
    data: str = option("", "labelled data; empty: the run's own validation split")
    out: str = option("", "folder for metrics.json and the plots; empty: <run>/evaluation")
    layout: str = option("auto", "data layout", choices=("auto", "kaggle", "folders", "csv"))
    tta: bool | None = option(None, "test-time augmentation (average over the image and its mirror image); default: as the run was validated")
    backend: str = option("auto", "inference backend", choices=("auto", "torch", "onnxruntime"))
    batch_size: int = option(64, "images per inference batch")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    feature_cache: bool = option(True, "runs trained with the head strategy: score through the cached backbone features, as training validated (--no-feature-cache runs the whole network on every image)")
    cache_dir: str = option("", "feature and model-file cache folder; empty: $CATDOG_CACHE or ~/.cache/catdog")
    mistakes_shown: int = option(24, "how many of the most confidently misclassified images mistakes.png shows")
    ood_data: str = option("", "a folder of photos that show none of the classes: measure how well the run says \"neither\" (AUROC, shares accepted and refused at its threshold, ood_scores.png)", metavar="DIR")

    def __post_init__(self):
        if not self.run:
            raise ValueError("--run is required")
        if self.mistakes_shown < 0:
            raise ValueError(f"--mistakes-shown must be >= 0, got {self.mistakes_shown}")


def evaluation_images(run_dir: Path, data: str, layout: str):
    """The labelled images to score and a note saying which they are."""
    split_path = run_dir / "split.json"
    split = json.loads(split_path.read_text()) if split_path.is_file() else None
    if not data and split is None:
        raise ValueError(f"{run_dir} has no split.json; pass --data")
    source = data or split["data"]
    images = discover(source, layout)
    if split and Path(images.root).resolve() == Path(split["root"]) and split.get("val"):
        wanted = set(split["val"])
        chosen = [i for i, path in enumerate(images.relative_paths()) if path in wanted]
        return images.subset(chosen), f"validation split of {source} ({len(chosen)} images held out during training)"
    return images, f"all {len(images)} labelled images in {source}"


def evaluate_run(config: EvaluateConfig, log=print) -> dict:
    run_dir = Path(config.run)
    check_not_pickle(run_dir)
    meta = read_meta(run_dir)
    images, description = evaluation_images(run_dir, config.data, config.layout)
    missing = set(images.class_names) - set(meta.class_names)
    if missing:
        raise ValueError(f"data has classes the model does not know: {sorted(missing)}")
    tta = meta.tta if config.tta is None else config.tta
    score_photos = photo_scorer(config, meta, tta)
    log(f"evaluating {meta.model_name} ({', '.join(meta.class_names)}) on {description}"
        + (" through its backbone's cached features" if config.feature_cache and meta.strategy == "head" else ""))
    outcome = score_photos(images.paths)
    class_names = list(meta.class_names)
    mapping = [class_names.index(name) for name in images.class_names]
    labels = np.array([mapping[images.labels[i]] for i in outcome.indices])
    metrics = classification_metrics(labels, outcome.probabilities, class_names)
    metrics["data"] = description
    # The run's probabilities carry its temperature; the curve before it shows what the temperature changed.
    after = reliability_curve(labels, outcome.probabilities)
    before = reliability_curve(labels, remove_temperature(outcome.probabilities, meta.temperature))
    metrics.update(calibration_entries(meta.temperature, before, after))
    metrics["failed_files"] = [{"path": e.path, "reason": e.reason} for e in outcome.errors]
    out_dir = Path(config.out) if config.out else run_dir / "evaluation"
    if config.ood_data:
        metrics["out_of_distribution"] = evaluate_out_of_distribution(config.ood_data, outcome, score_photos,
                                                                      meta.ood_threshold, out_dir, log)
    write_json_atomic(out_dir / "metrics.json", metrics)
    relative_paths = images.relative_paths()  # once: it resolves every path
    scored_paths = [relative_paths[i] for i in outcome.indices]
    write_predictions_csv(out_dir / "predictions.csv", scored_paths, labels, outcome.probabilities, class_names)
    plot_confusion_matrix(np.array(metrics["confusion_matrix"]), class_names, out_dir / "confusion_matrix.png")
    plot_roc(labels, outcome.probabilities, class_names, out_dir / "roc.png")
    plot_reliability_diagrams({"before temperature (T = 1)": before, f"after temperature (T = {meta.temperature:.3f})": after},
                              out_dir / "reliability.png")
    mistakes = most_confident_mistakes(labels, outcome.probabilities, config.mistakes_shown)
    plot_mistakes([images.paths[outcome.indices[i]] for i in mistakes], labels[mistakes], outcome.probabilities[mistakes],
                  class_names, out_dir / "mistakes.png")
    log(format_metrics(metrics))
    log(f"wrote metrics.json, predictions.csv, confusion_matrix.png, roc.png, reliability.png and mistakes.png "
        f"({len(mistakes)} most confident mistakes) to {out_dir}")
    return metrics


def calibration_entries(temperature: float, before: ReliabilityCurve, after: ReliabilityCurve) -> dict:
    """metrics.json's calibration entries: the run's temperature, the ECE of its probabilities (`ece`) and of the
    same probabilities without the temperature (`ece_before_temperature`), and both reliability curves."""
    return {"temperature": temperature, "ece": after.ece, "ece_before_temperature": before.ece,
            "reliability": {"before_temperature": before.to_dict(), "after_temperature": after.to_dict()}}


def photo_scorer(config: EvaluateConfig, meta, tta: bool):
    """paths -> PredictionOutcome, as this evaluation scores photos: a head run through its cached features
    (unless --no-feature-cache), any other through its predictor (the exported file on ONNX Runtime, or PyTorch)."""
    if config.feature_cache and meta.strategy == "head":
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        return lambda paths: predict_through_feature_cache(Path(config.run), paths, tta, config.device, config.backend, cache_dir)
    predictor = load_run_predictor(config.run, config.backend, config.device, config.cache_dir or None)
    return lambda paths: predictor.predict_files(paths, batch_size=config.batch_size, tta=tta)


def evaluate_out_of_distribution(ood_data: str, outcome: PredictionOutcome, score_photos, threshold: float | None,
                                 out_dir: Path, log) -> dict:
    """Score the photos of `ood_data` (none of the run's classes) beside the evaluated photos; metrics.json's
    `out_of_distribution` entry and ood_scores.png."""
    if outcome.ood_scores is None or threshold is None:
        raise RunError("--ood-data: this run has no out-of-distribution score (trained before catdog 0.5); train it again")
    folder = Path(ood_data)
    paths, left_out = find_image_files(folder)
    if not paths:
        raise DataError(f"{folder}: no images to score for --ood-data" + (f"; {describe_left_out(left_out)}" if left_out else ""))
    other = score_photos(paths)
    relative = [relative_to_root(paths[i], folder) for i in other.indices]
    groups = [path.split("/")[0] if "/" in path else folder.name for path in relative]  # sub-folders, if any
    summary = out_of_distribution_summary(outcome.ood_scores, other.ood_scores, threshold, groups, str(folder))
    plot_out_of_distribution_scores(outcome.ood_scores, other.ood_scores, threshold, folder.name, out_dir / "ood_scores.png")
    log(f"neither: AUROC {summary['auroc']:.4f} against {len(paths)} photos of {folder}; at the threshold "
        f"{summary['other_accepted_share']:.1%} of them accepted, {summary['validation_refused_share']:.1%} of the "
        "evaluated photos refused (ood_scores.png)")
    return summary


def predict_through_feature_cache(run_dir: Path, paths: list, tta: bool, device: str, backend: str,
                                  cache_dir: Path | None) -> PredictionOutcome:
    """A head-strategy run's calibrated probabilities: its head on the frozen backbone's cached features (the
    backbone runs only on images not cached yet). Equal to running the whole network up to the float16 rounding
    of cached features, which is what training validated and calibrated on."""
    import torch

    from catdog.features import extract_features

    model, meta = load_model(run_dir)
    views = ("original", "flipped") if tta else ("original",)
    feature_set = extract_features(paths, lambda: model.backbone, meta.model_name, meta.preprocess, views,
                                   device=resolve_device(device), backend=backend, cache_dir=cache_dir)
    usable = np.flatnonzero(feature_set.valid_mask())
    with torch.inference_mode():
        logits = model.head(torch.from_numpy(feature_set.features[usable])).mean(dim=1)  # averaged over the views
        probabilities = torch.softmax(logits / meta.temperature, dim=1).numpy()
    ood_scores = None
    if meta.ood_method == "knn" and (run_dir / OOD_FILE).is_file():  # the first view, as predict scores it
        ood_scores = KnnScorer.load(run_dir / OOD_FILE).scores(feature_set.features[usable, 0])
    return PredictionOutcome(usable.tolist(), probabilities, feature_set.errors, feature_set.seconds, ood_scores)


def write_predictions_csv(path: Path, relative_paths: list[str], labels: np.ndarray, probabilities: np.ndarray,
                          class_names: list[str]) -> None:
    """One row per scored image: its true and predicted class, the probability of each class, and the image's loss,
    so the worst cases can be sorted and looked at."""
    predicted = probabilities.argmax(axis=1)
    losses = -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-15, 1.0))
    header = ["path", "label", "predicted", "correct", "loss"] + [f"p_{name}" for name in class_names]
    rows = ([path, class_names[label], class_names[guess], int(label == guess), f"{loss:.6f}"] + [f"{p:.6f}" for p in row]
            for path, label, guess, loss, row in zip(relative_paths, labels, predicted, losses, probabilities))
    write_csv_atomic(path, header, rows)


def most_confident_mistakes(labels: np.ndarray, probabilities: np.ndarray, limit: int) -> np.ndarray:
    """Positions of wrongly classified images, the most confidently wrong first (fastai's "top losses")."""
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != labels)
    confidence_in_truth = probabilities[wrong, labels[wrong]]
    return wrong[np.argsort(confidence_in_truth, kind="stable")][:limit]


def plot_mistakes(paths: list, labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], path: Path,
                  tile: int = 160) -> None:
    """A grid of misclassified photos titled "true -> predicted (probability)"; an empty grid says there were none."""
    from catdog.plotting import save_photo_grid

    captions = []
    for image_path, label, row in zip(paths, labels, probabilities):
        guess = int(row.argmax())
        captions.append((image_path, f"{class_names[label]} -> {class_names[guess]} ({row[guess]:.2f})\n{Path(image_path).name}"))
    save_photo_grid(captions, path, "Most confident mistakes (true -> predicted)", "no mistakes", tile)


def format_metrics(metrics: dict) -> str:
    lines = [f"accuracy {metrics['accuracy']:.4f}  log loss {metrics['log_loss']:.4f}  macro F1 {metrics['macro_f1']:.4f}"
             + (f"  ROC AUC {metrics['roc_auc']:.4f}" if "roc_auc" in metrics else "")
             + (f"  ECE {metrics['ece']:.4f} (before temperature {metrics['ece_before_temperature']:.4f})" if "ece" in metrics else "")]
    lines.append(f"{'class':>12} {'precision':>10} {'recall':>10} {'f1':>10} {'support':>8}")
    for name, values in metrics["per_class"].items():
        lines.append(f"{name:>12} {values['precision']:10.4f} {values['recall']:10.4f} {values['f1']:10.4f} {values['support']:8d}")
    lines.append("confusion matrix (rows true, columns predicted): " + json.dumps(metrics["confusion_matrix"]))
    return "\n".join(lines)


def _pyplot():
    from catdog.plotting import headless_pyplot

    return headless_pyplot()


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    plt = _pyplot()
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), value in np.ndenumerate(matrix):
        axes.text(column, row, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    axes.set_title("Confusion matrix")
    figure.tight_layout()
    write_with_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], path: Path) -> None:
    from sklearn.metrics import auc, roc_curve

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 5))
    positives = [1] if len(class_names) == 2 else range(len(class_names))
    for index in positives:
        truth = (labels == index).astype(int)
        if truth.min() == truth.max():
            continue
        false_positive, true_positive, _ = roc_curve(truth, probabilities[:, index])
        axes.plot(false_positive, true_positive, label=f"{class_names[index]} (AUC {auc(false_positive, true_positive):.4f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("ROC")
    axes.legend(loc="lower right")
    figure.tight_layout()
    write_with_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)
