"""`catdog evaluate`: metrics and plots for a trained run on labelled data.

When the data is the run's own training data, only its validation split (from split.json) is evaluated: scoring
the images the model trained on would report a flattering, meaningless figure.

A run trained with the head strategy has the untouched pretrained backbone, so its scores are its head applied to
that backbone's features, which training cached for every photo it saw: evaluating such a run right after
training reads them instead of running the network again (seconds instead of minutes), and caches what is new.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from catdog.training.config import EvaluateConfig
from catdog.training.calibration import ReliabilityCurve, plot_reliability_diagrams, reliability_curve, remove_temperature
from catdog.training.checkpoint import load_model
from catdog.training.neither import TaughtNeither
from catdog.training.ood import OOD_FILE, KnnScorer, TaughtScores, out_of_distribution_summary, plot_out_of_distribution_scores
from catdog.runtime.runs import NEITHER_FILE, RunError, RunMeta, check_not_pickle, read_meta
from catdog.runtime.data import DataError, describe_left_out, discover, discover_sources, find_image_files, relative_to_root
from catdog.training.devices import resolve_device
from catdog.training.features import extract_features, file_digest, view_name
from catdog.runtime.files import write_csv_atomic, write_json_atomic, write_with_atomic
from catdog.runtime.images import ImageLoadError, load_image
from catdog.training.metrics import classification_metrics
from catdog.training import corruptions
from catdog.training.backends import load_run_predictor
from catdog.runtime.predict import PredictionOutcome
from catdog.runtime.probabilities import QUARTER_TURNS, OrientationCheck, softmax, uses_mirror_view


def evaluation_images(run_dir: Path, data: str, layout: str):
    """The labelled images to score and a note saying which they are. A run trained on several sources (split.json
    lists them) has them merged again as training merged them, so its validation split is found the same way."""
    split_path = run_dir / "split.json"
    split = json.loads(split_path.read_text()) if split_path.is_file() else None
    if not data and split is None:
        raise ValueError(f"{run_dir} has no split.json; pass --data")
    source = data or split["data"]
    if isinstance(source, list):
        images, _ = discover_sources(source, layout)
        source = " + ".join(source)
    else:
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
    relative_paths = images.relative_paths()  # once: it resolves every path
    scored_paths = [relative_paths[i] for i in outcome.indices]
    if meta.taught_neither and outcome.neither_distances is not None:
        metrics["taught_neither"] = taught_refusals_of(meta, outcome, scored_paths)
    if config.ood_data:
        metrics["out_of_distribution"] = evaluate_out_of_distribution(config.ood_data, outcome, score_photos, meta,
                                                                      out_dir, log)
    if config.corruptions:
        metrics["corruptions"] = corruption_table(config, images, log)
        plot_corruptions(metrics["corruptions"], out_dir / "corruptions.png")
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_predictions_csv(out_dir / "predictions.csv", scored_paths, labels, outcome.probabilities, class_names)
    plot_confusion_matrix(np.array(metrics["confusion_matrix"]), class_names, out_dir / "confusion_matrix.png")
    plot_roc(labels, outcome.probabilities, class_names, out_dir / "roc.png")
    plot_reliability_diagrams({"before temperature (T = 1)": before, f"after temperature (T = {meta.temperature:.3f})": after},
                              out_dir / "reliability.png")
    mistakes = most_confident_mistakes(labels, outcome.probabilities, config.mistakes_shown)
    plot_mistakes([images.paths[outcome.indices[i]] for i in mistakes], labels[mistakes], outcome.probabilities[mistakes],
                  class_names, out_dir / "mistakes.png")
    log(format_metrics(metrics))
    if "taught_neither" in metrics:
        log(format_taught(metrics["taught_neither"]))
    if "corruptions" in metrics:
        log(format_corruptions(metrics["corruptions"]) + "\n(corruptions.png)")
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
    (unless --no-feature-cache), any other through its predictor (the exported file on ONNX Runtime, or PyTorch).
    Both as the run was validated: no orientation check (only `--corruptions` scores photos as predict does)."""
    if config.feature_cache and meta.strategy == "head":
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        return lambda paths: predict_through_feature_cache(Path(config.run), paths, tta, config.device, config.backend, cache_dir)
    predictor = load_run_predictor(config.run, config.backend, config.device, config.cache_dir or None)
    return lambda paths: predictor.predict_files(paths, batch_size=config.batch_size, tta=tta, check_orientation=False)


def taught_refusals_of(meta: RunMeta, outcome: PredictionOutcome, relative_paths: list[str]) -> dict:
    """metrics.json's `taught_neither`: how many of the evaluated (pet) photos the run's taught "neither" examples
    refuse, beside the automatic score, and which (with the example each is like)."""
    from catdog.runtime.probabilities import taught_refusals

    scores, distances = np.asarray(outcome.ood_scores), np.asarray(outcome.neither_distances)
    taught = taught_refusals(scores, distances, meta.neither_margin, outcome.neither_scores, meta.neither_threshold)
    unlike = scores > meta.ood_threshold
    names = meta.neither_files
    refused = [{"path": relative_paths[i], "ood_score": float(scores[i]), "neither_distance": float(distances[i]),
                "nearest_neither": names[int(outcome.nearest_neither[i])] if 0 <= int(outcome.nearest_neither[i]) < len(names) else ""}
               for i in np.flatnonzero(taught)]
    return {"examples": meta.taught_neither, "margin": meta.neither_margin, "threshold": meta.neither_threshold,
            "photos": len(scores),
            "refused_by_score_share": float(unlike.mean()) if len(scores) else 0.0,
            "refused_by_taught_share": float(taught.mean()) if len(scores) else 0.0,
            "refused_share": float((taught | unlike).mean()) if len(scores) else 0.0,
            "refused_by_taught": refused}


def format_taught(entry: dict) -> str:
    """evaluate's lines about the taught examples on the evaluated photos."""
    lines = [f"neither: {entry['refused_share']:.2%} of the {entry['photos']} evaluated photos refused "
             f"({entry['refused_by_score_share']:.2%} by the out-of-distribution score, {entry['refused_by_taught_share']:.2%} "
             f"by the {entry['examples']} taught examples)"]
    lines += [f"  {row['path']}: like {row['nearest_neither']}" for row in entry["refused_by_taught"][:10]]
    if len(entry["refused_by_taught"]) > 10:
        lines.append(f"  ... and {len(entry['refused_by_taught']) - 10} more (metrics.json, taught_neither)")
    return "\n".join(lines)


def evaluate_out_of_distribution(ood_data: str, outcome: PredictionOutcome, score_photos, meta: RunMeta,
                                 out_dir: Path, log) -> dict:
    """Score the photos of `ood_data` (none of the run's classes) beside the evaluated photos; metrics.json's
    `out_of_distribution` entry, ood_scores.png and ood_predictions.csv (each photo's score and, with taught
    examples, why it was refused and by which example)."""
    threshold = meta.ood_threshold
    if outcome.ood_scores is None or threshold is None:
        raise RunError("--ood-data: this run has no out-of-distribution score (trained before catdog 0.5); train it again")
    folder = Path(ood_data)
    paths, left_out = find_image_files(folder)
    if not paths:
        raise DataError(f"{folder}: no images to score for --ood-data" + (f"; {describe_left_out(left_out)}" if left_out else ""))
    other = score_photos(paths)
    relative = [relative_to_root(paths[i], folder) for i in other.indices]
    groups = [path.split("/")[0] if "/" in path else folder.name for path in relative]  # sub-folders, if any
    taught = None
    names = meta.neither_files
    if meta.taught_neither and outcome.neither_distances is not None and other.neither_distances is not None:
        nearest = [names[int(i)] if 0 <= int(i) < len(names) else "" for i in other.nearest_neither]
        taught = TaughtScores(meta.neither_margin, meta.neither_threshold, meta.taught_neither, outcome.neither_distances,
                              outcome.neither_scores, other.neither_distances, other.neither_scores, nearest)
    summary = out_of_distribution_summary(outcome.ood_scores, other.ood_scores, threshold, groups, str(folder), taught)
    plot_out_of_distribution_scores(outcome.ood_scores, other.ood_scores, threshold, folder.name, out_dir / "ood_scores.png")
    write_ood_predictions(out_dir / "ood_predictions.csv", relative, groups, other, threshold, taught)
    log(f"neither: AUROC {summary['auroc']:.4f} against {len(paths)} photos of {folder}; at the threshold "
        f"{summary['other_accepted_share']:.1%} of them accepted, {summary['validation_refused_share']:.1%} of the "
        "evaluated photos refused (ood_scores.png, ood_predictions.csv)")
    if taught is not None:
        found = summary["taught"]
        log(f"neither, with the {found['examples']} taught examples: {found['other_accepted_share']:.1%} of them accepted "
            f"({found['other_refused_by_taught']} refused by the taught examples, {found['other_refused_by_taught_only']} "
            f"of those accepted by the score alone), {found['validation_refused_share']:.1%} of the evaluated photos refused"
            + ("; most refusing: " + ", ".join(f"{name} ({count})" for name, count in found["nearest_examples"][:3])
               if found["nearest_examples"] else ""))
    return summary


def write_ood_predictions(path: Path, relative: list[str], groups: list[str], other: PredictionOutcome, threshold: float,
                          taught: TaughtScores | None) -> None:
    """One row per --ood-data photo: its group, score, decision and (with taught examples) why and which example."""
    from catdog.runtime.probabilities import REFUSED_TAUGHT, REFUSED_UNLIKE

    header = ["path", "group", "ood_score", "in_distribution"]
    scores = np.asarray(other.ood_scores)
    refused_taught = np.zeros(len(scores), dtype=bool)
    if taught is not None:
        header += ["neither_score", "neither_distance", "refused_by", "nearest_neither"]
        refused_taught = taught.refusals(scores, other=True)
    rows = []
    for i, (name, group, score) in enumerate(zip(relative, groups, scores)):
        unlike = score > threshold
        row = [name, group, f"{score:.6f}", "false" if unlike or refused_taught[i] else "true"]
        if taught is not None:
            why = REFUSED_TAUGHT if refused_taught[i] else REFUSED_UNLIKE if unlike else ""
            head = "" if taught.other_scores is None else f"{taught.other_scores[i]:.6f}"
            row += [head, f"{taught.other_distances[i]:.6f}", why, taught.other_nearest[i] if refused_taught[i] else ""]
        rows.append(row)
    write_csv_atomic(path, header, rows)


def predict_through_feature_cache(run_dir: Path, paths: list, tta: bool, device: str, backend: str,
                                  cache_dir: Path | None) -> PredictionOutcome:
    """A head-strategy run's calibrated probabilities: its head on the frozen backbone's cached features (the
    backbone runs only on images not cached yet). Equal to running the whole network up to the float16 rounding
    of cached features, which is what training validated and calibrated on."""
    model, meta = load_model(run_dir)
    views = ("original", "flipped") if tta else ("original",)
    feature_set = extract_features(paths, lambda: model.backbone, meta.model_name, meta.preprocess, views,
                                   device=resolve_device(device), backend=backend, cache_dir=cache_dir)
    usable = np.flatnonzero(feature_set.valid_mask())
    with torch.inference_mode():
        logits = model.head(torch.from_numpy(feature_set.features[usable])).mean(dim=1)  # averaged over the views
        probabilities = torch.softmax(logits / meta.temperature, dim=1).numpy()
    ood_scores = neither_distances = nearest = head_scores = None
    if meta.ood_method == "knn" and (run_dir / OOD_FILE).is_file():  # the first view, as predict scores it
        ood_scores = KnnScorer.load(run_dir / OOD_FILE).scores(feature_set.features[usable, 0])
        if meta.taught_neither and (run_dir / NEITHER_FILE).is_file():
            head_scores, neither_distances, nearest = TaughtNeither.load(run_dir / NEITHER_FILE).outputs(feature_set.features[usable, 0])
    return PredictionOutcome(usable.tolist(), probabilities, feature_set.errors, feature_set.seconds, ood_scores,
                             neither_distances, nearest, head_scores)


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
    from catdog.training.plotting import save_photo_grid

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
    from catdog.training.plotting import headless_pyplot

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


# ---------------------------------------------------------------- damaged photos (--corruptions)


def corruption_table(config: EvaluateConfig, images, log=print) -> dict:
    """Accuracy and log loss on `images` clean and under each kind of damage at its two severities
    (`corruptions.SEVERITIES`), each photo's damage seeded by its content digest, so a head run through the feature
    cache and any run through its predictor see the same damaged pixels.

    Every condition is scored as `predict` scores a photo: the first view, and the mirror view where the run would
    add it (below its `mirror_below` confidence; `--tta` every photo, `--no-tta` none), after the orientation check
    (`--check-orientation`, on by default as in predict); the clean row the same way, so the rows compare."""
    run_dir = Path(config.run)
    meta = read_meta(run_dir)
    class_names = list(meta.class_names)
    mapping = [class_names.index(name) for name in images.class_names]
    labels = np.array([mapping[label] for label in images.labels])
    through_cache = config.feature_cache and meta.strategy == "head"
    scorer = (_CachedHeadScorer(run_dir, config) if through_cache
              else _PredictorScorer(load_run_predictor(config.run, config.backend, config.device, config.cache_dir or None),
                                    config.batch_size))
    log(f"damaged photos: {len(images)} photos x {len(corruptions.conditions())} conditions "
        + ("through the cached backbone features" if through_cache else "through the predictor"))

    def row(condition: str | None) -> dict:
        indices, probabilities = scorer.score(images.paths, condition, config.tta, config.check_orientation)
        truth = labels[indices]
        chosen = np.clip(probabilities[np.arange(len(indices)), truth], 1e-15, 1.0)
        return {"accuracy": float((probabilities.argmax(axis=1) == truth).mean()) if len(indices) else float("nan"),
                "log_loss": float(-np.log(chosen).mean()) if len(indices) else float("nan"), "count": len(indices)}

    mirror_rule = {None: "as predict: the mirror view below the run's mirror_below confidence", True: "every photo",
                   False: "none"}[config.tta]
    table = {"photos": len(images), "mirror_view": mirror_rule, "orientation_check": config.check_orientation,
             "clean": row(None), "conditions": [],
             "severities": {kind: {"unit": s.unit, "mild": s.mild, "strong": s.strong, "why": s.why}
                            for kind, s in corruptions.SEVERITIES.items()}}
    for kind, severity in corruptions.conditions("both"):
        level = "strong" if severity == corruptions.SEVERITIES[kind].strong else "mild"
        result = row(corruptions.condition_name(kind, severity))
        table["conditions"].append({"kind": kind, "severity": severity, "level": level, **result})
        log(f"  {kind:<10} {level:<6} {severity:>6g}  accuracy {result['accuracy']:.4f}  log loss {result['log_loss']:.4f}")
    for level in ("strong", "mild"):
        rows = [r for r in table["conditions"] if r["level"] == level]
        worst = min(rows, key=lambda r: r["accuracy"])
        table[f"{level}_summary"] = {"mean_accuracy": float(np.mean([r["accuracy"] for r in rows])),
                                     "mean_log_loss": float(np.mean([r["log_loss"] for r in rows])),
                                     "min_accuracy": worst["accuracy"], "worst_kind": worst["kind"]}
    return table


class _CachedHeadScorer:
    """A head run's calibrated probabilities from cached features of damaged (or clean) views."""

    def __init__(self, run_dir: Path, config: EvaluateConfig):
        self.model, self.meta = load_model(run_dir)
        self.device, self.backend = resolve_device(config.device), config.backend
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else None
        has_bank = self.meta.ood_method == "knn" and (run_dir / OOD_FILE).is_file()
        self.ood_scorer = KnnScorer.load(run_dir / OOD_FILE) if has_bank else None
        self.orientation_check = (OrientationCheck.from_validation_scores(self.meta.ood_validation_scores, self.meta.ood_threshold)
                                  if has_bank else None)

    def _features(self, paths: list, view: str):
        return extract_features(paths, lambda: self.model.backbone, self.meta.model_name, self.meta.preprocess, (view,),
                                device=self.device, backend=self.backend, cache_dir=self.cache_dir)

    def _logits(self, features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model.head(torch.from_numpy(np.ascontiguousarray(features))).numpy()

    def score(self, paths: list, condition: str | None, tta: bool | None,
              check_orientation: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """As `Predictor.predict_batch` does on the photos: the first view, the orientation check (the photos that
        look turned read turned, from the cached features of their turned views), then the mirror view."""
        base = condition or "original"
        features = self._features(paths, view_name(base))
        usable = np.flatnonzero(features.valid_mask())
        logits = self._logits(features.features[usable, 0])
        turns = np.zeros(len(usable), dtype=int)
        if check_orientation and self.orientation_check is not None:
            self._turn_upright(paths, usable, base, features.features[usable, 0], logits, turns)
        probabilities = softmax(logits / self.meta.temperature)
        rows = np.flatnonzero(uses_mirror_view(probabilities, tta, self.meta.tta, self.meta.mirror_below))
        for turn in np.unique(turns[rows]):
            group = rows[turns[rows] == turn]
            flipped = self._features([paths[i] for i in usable[group]], view_name(base, int(turn), mirrored=True))
            good = flipped.valid_mask()
            logits[group[good]] = (logits[group[good]] + self._logits(flipped.features[good, 0])) / 2
        return usable, softmax(logits / self.meta.temperature)

    def _turn_upright(self, paths: list, usable: np.ndarray, base: str, first_features: np.ndarray,
                      logits: np.ndarray, turns: np.ndarray) -> None:
        """`Predictor.upright` on cached features: updates `logits` and `turns` in place for the photos read turned."""

        def turned_outputs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # Features of files the first view read are valid for their turned views too (the same decoded image).
            turned = np.stack([self._features([paths[i] for i in usable[rows]], view_name(base, k)).features[:, 0]
                               for k in QUARTER_TURNS], axis=1)  # [R, turns, D]
            return (np.stack([self._logits(turned[:, t]) for t in range(len(QUARTER_TURNS))], axis=1),
                    np.stack([self.ood_scorer.scores(turned[:, t]) for t in range(len(QUARTER_TURNS))], axis=1))

        rows, ks, turned_logits = self.orientation_check.turns_to_take(logits, self.ood_scorer.scores(first_features),
                                                                       self.meta.temperature, turned_outputs)
        logits[rows] = turned_logits
        turns[rows] = ks


class _PredictorScorer:
    """Any run's calibrated probabilities from its predictor on damaged images (as `catdog predict` would see them)."""

    def __init__(self, predictor, batch_size: int):
        self.predictor, self.batch_size = predictor, max(1, batch_size)

    def score(self, paths: list, condition: str | None, tta: bool | None,
              check_orientation: bool = False) -> tuple[np.ndarray, np.ndarray]:
        indices, arrays, probabilities = [], [], []

        def flush():
            if arrays:
                probabilities.append(self.predictor.predict_batch(np.stack(arrays), tta, check_orientation)[0])
                arrays.clear()

        for index, path in enumerate(paths):
            try:
                image = load_image(path)
                if condition is not None:
                    kind, severity = corruptions.parse_condition(condition)
                    image = corruptions.damage(image, kind, severity, file_digest(path))
            except (ImageLoadError, OSError):
                continue
            indices.append(index)
            arrays.append(self.predictor.transform(image))
            if len(arrays) >= self.batch_size:
                flush()
        flush()
        classes = len(self.predictor.class_names)
        return np.array(indices, dtype=int), np.concatenate(probabilities) if probabilities else np.zeros((0, classes))


def format_corruptions(table: dict) -> str:
    """The damaged-photos table as text: one line per kind, both severities."""
    lines = [f"damaged photos ({table['photos']} photos; mirror view: {table['mirror_view']}): "
             f"clean accuracy {table['clean']['accuracy']:.4f}  log loss {table['clean']['log_loss']:.4f}",
             f"{'kind':<11}{'strong':>9} {'accuracy':>9} {'log loss':>9}   {'mild':>7} {'accuracy':>9} {'log loss':>9}"]
    by_kind: dict[str, dict] = {}
    for row in table["conditions"]:
        by_kind.setdefault(row["kind"], {})[row["level"]] = row
    for kind, levels in by_kind.items():
        strong, mild = levels["strong"], levels["mild"]
        lines.append(f"{kind:<11}{strong['severity']:>9g} {strong['accuracy']:>9.4f} {strong['log_loss']:>9.4f}   "
                     f"{mild['severity']:>7g} {mild['accuracy']:>9.4f} {mild['log_loss']:>9.4f}")
    for level in ("strong", "mild"):
        summary = table.get(f"{level}_summary")
        if summary:
            lines.append(f"{level}: mean accuracy {summary['mean_accuracy']:.4f}, lowest {summary['min_accuracy']:.4f} "
                         f"({summary['worst_kind']}); mean log loss {summary['mean_log_loss']:.4f}")
    return "\n".join(lines)


def plot_corruptions(table: dict, path: Path) -> None:
    """Accuracy and log loss per kind of damage at both severities, the clean figures as a dashed line."""
    plt = _pyplot()
    kinds = list(dict.fromkeys(row["kind"] for row in table["conditions"]))
    values = {(row["kind"], row["level"]): row for row in table["conditions"]}
    figure, axes_pair = plt.subplots(1, 2, figsize=(11, 4))
    positions = np.arange(len(kinds))
    for axes, key, name in ((axes_pair[0], "accuracy", "accuracy"), (axes_pair[1], "log_loss", "log loss")):
        for offset, level, colour in ((-0.2, "mild", "#8fb3f0"), (0.2, "strong", "#2f6fed")):
            heights = [values[(kind, level)][key] if (kind, level) in values else np.nan for kind in kinds]
            axes.bar(positions + offset, heights, width=0.4, color=colour, label=level)
        axes.axhline(table["clean"][key], color="black", linestyle="--", linewidth=1, label="clean")
        axes.set_xticks(positions, kinds, rotation=30, ha="right")
        axes.set_ylabel(name)
        axes.grid(axis="y", alpha=0.3)
    accuracies = [row["accuracy"] for row in table["conditions"]] + [table["clean"]["accuracy"]]
    axes_pair[0].set_ylim(max(0.0, float(np.nanmin(accuracies)) - 0.02), 1.0)
    axes_pair[0].legend(loc="lower left")
    figure.suptitle(f"Damaged photos ({table['photos']} photos; each kind at two severities)")
    figure.tight_layout()
    write_with_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)


def add_corruptions(config: EvaluateConfig, log=print) -> dict:
    """The damaged-photos table of an existing evaluation (its metrics.json gains `corruptions`, its folder
    corruptions.png) without redoing the rest; returns the updated metrics."""
    run_dir = Path(config.run)
    out_dir = Path(config.out) if config.out else run_dir / "evaluation"
    images, _ = evaluation_images(run_dir, config.data, config.layout)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    metrics["corruptions"] = corruption_table(config, images, log)
    plot_corruptions(metrics["corruptions"], out_dir / "corruptions.png")
    write_json_atomic(out_dir / "metrics.json", metrics)
    log(format_corruptions(metrics["corruptions"]))
    return metrics
