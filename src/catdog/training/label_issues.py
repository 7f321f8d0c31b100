"""`catdog data issues`: the training photos whose label the model least believes (likely label errors).

Confident learning (Northcutt et al., 2021, the `cleanlab` library) needs, for every photo, class probabilities
from a model that never saw that photo: out-of-fold probabilities. Here they come from k logistic-regression
heads, each trained on the frozen backbone's features of the other k-1 folds. The features are the ones the head
strategy of `catdog train` uses (same preset, model, input size and mirror images, averaged per photo), read from
the same feature cache, so after a training run on the same photos this takes seconds.

cleanlab flags the photos it counts as label issues, ranked by self-confidence (the probability of the given
label, lowest first); every other photo follows by the same measure, so the CSV is a complete ranking, most
suspicious first. `catdog train --exclude label_issues.csv` leaves out the flagged rows (`label_issue` = 1) and
`--exclude` also takes a plain list of paths (like `data audit`'s quarantine.txt); reading those lists is
`catdog.training.exclusions`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catdog.training.config import LabelIssuesConfig
from catdog.runtime.data import DataError, LabelledImages, default_num_workers, discover
from catdog.training.devices import resolve_device
from catdog.training.features import default_cache_dir, extract_features
from catdog.runtime.files import write_csv_atomic
from catdog.runtime.images import ImageLoadError
from catdog.training.models import create_model
from catdog.training.plotting import save_photo_grid
from catdog.runtime.progress import progress_bar
from catdog.training.config import TrainConfig
from catdog.training.strategy import resolve_preprocess

CSV_COLUMNS = ["path", "given_label", "suggested_label", "given_label_probability", "label_issue"]


@dataclass
class LabelIssue:
    """One photo of the ranking. `path` is relative to the data set's root (as in split.json and predictions.csv)."""

    path: str
    absolute_path: Path
    given_label: str
    suggested_label: str
    given_label_probability: float
    label_issue: bool  # flagged by confident learning


@dataclass
class LabelIssuesResult:
    rows: list[LabelIssue]  # every usable photo, most suspicious first
    errors: list[ImageLoadError]  # photos that could not be read (left out of the ranking)
    seconds: float

    @property
    def flagged(self) -> list[LabelIssue]:
        return [row for row in self.rows if row.label_issue]


def photo_features(images: LabelledImages, preset: str, device: str = "auto", cache_dir: Path | None = None,
                   progress=None) -> tuple[np.ndarray, list[ImageLoadError]]:
    """One feature vector per photo (NaN rows for unreadable ones): the head strategy's frozen-backbone features
    for `preset`, from the feature cache or the backbone, averaged over the preset's views (the photo and its
    mirror image), as test-time averaging does."""
    train_config = TrainConfig(data=str(images.root), preset=preset)
    preprocess = resolve_preprocess(train_config, "head")
    views = ("original", "flipped") if train_config.flip else ("original",)
    feature_set = extract_features(
        images.paths,
        lambda: create_model(train_config.model, len(images.class_names), pretrained=True, freeze_backbone=True).backbone,
        train_config.model, preprocess, views, device=resolve_device(device), cache_dir=cache_dir or default_cache_dir(),
        num_workers=max(1, default_num_workers() - 1), progress=progress,
    )
    return feature_set.features.mean(axis=1), feature_set.errors


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Class probabilities of each photo from a logistic-regression head trained on the folds it is not in
    (standardised features, L2-regularised)."""
    # Imported here: scikit-learn adds about a second to start-up, and only this step needs it.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    smallest_class = int(np.bincount(labels).min())
    if smallest_class < 2:
        raise DataError("every class needs at least 2 readable photos for out-of-fold probabilities")
    folds = min(folds, smallest_class)
    probabilities = np.zeros((len(labels), int(labels.max()) + 1))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train_part, held_out in splitter.split(features, labels):
        head = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
        head.fit(features[train_part], labels[train_part])
        probabilities[held_out] = head.predict_proba(features[held_out])
    return probabilities


def rank_label_issues(labels: np.ndarray, probabilities: np.ndarray) -> tuple[list[int], set[int]]:
    """Every position, most suspicious first: cleanlab's label issues ranked by self-confidence, then the rest by
    the probability of their given label, lowest first. Also returns the flagged positions."""
    # Imported here: cleanlab adds over a second to start-up, and only this step needs it.
    from cleanlab import filter as cleanlab_filter

    ranked = cleanlab_filter.find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence")
    flagged = [int(i) for i in ranked]
    given_label_probability = probabilities[np.arange(len(labels)), labels]
    flagged_set = set(flagged)
    rest = [int(i) for i in np.argsort(given_label_probability, kind="stable") if int(i) not in flagged_set]
    return flagged + rest, flagged_set


def find_label_issues(data: str | Path | LabelledImages, preset: str = "default", folds: int = 5, seed: int = 42,
                      layout: str = "auto", device: str = "auto", cache_dir: Path | None = None,
                      progress=None) -> LabelIssuesResult:
    """Rank the labelled photos of `data` by how little out-of-fold heads believe their given label."""
    started = time.perf_counter()
    images = data if isinstance(data, LabelledImages) else discover(data, layout)
    features, errors = photo_features(images, preset, device, cache_dir, progress)
    usable = np.flatnonzero(~np.isnan(features).any(axis=1))
    labels = np.asarray(images.labels)[usable]
    if len(np.unique(labels)) < len(images.class_names):
        raise DataError(f"{images.root}: some class has no readable photo")
    probabilities = out_of_fold_probabilities(features[usable], labels, folds, seed)
    order, flagged = rank_label_issues(labels, probabilities)
    relative_paths = images.relative_paths()
    rows = []
    for position in order:
        index = int(usable[position])
        given = labels[position]
        rows.append(LabelIssue(relative_paths[index], images.paths[index], images.class_names[given],
                               images.class_names[int(probabilities[position].argmax())],
                               float(probabilities[position, given]), position in flagged))
    return LabelIssuesResult(rows, errors, time.perf_counter() - started)


def write_label_issues_csv(path: Path, rows: list[LabelIssue]) -> None:
    write_csv_atomic(path, CSV_COLUMNS, ([row.path, row.given_label, row.suggested_label,
                                          f"{row.given_label_probability:.6f}", int(row.label_issue)] for row in rows))


def plot_label_issues(rows: list[LabelIssue], path: Path, tile: int = 160) -> None:
    """A grid of the most suspicious photos titled "given -> suggested (probability of the given label)"."""
    captions = [(row.absolute_path, f"{row.given_label} -> {row.suggested_label} ({row.given_label_probability:.3f})"
                                    f"{' *' if row.label_issue else ''}\n{Path(row.path).name}") for row in rows]
    save_photo_grid(captions, path, "Likely label errors: given -> suggested (probability of the given label); * flagged",
                    "no photos", tile)


def run_label_issues(config: LabelIssuesConfig, log=print) -> int:
    images = discover(config.data, config.layout)
    log(f"data: {len(images)} images in {images.layout} layout, classes {images.class_counts()}; "
        f"{config.folds}-fold out-of-fold probabilities on {config.preset} preset features")
    with progress_bar(config.progress, len(images), "features") as bar:
        result = find_label_issues(images, config.preset, config.folds, config.seed, device=config.device,
                                   cache_dir=Path(config.cache_dir) if config.cache_dir else None, progress=bar.update)
    output = Path(config.output)
    write_label_issues_csv(output, result.rows)
    grid = output.with_suffix(".png")
    plot_label_issues(result.rows[: config.shown], grid)
    for error in result.errors:
        log(f"unreadable, left out: {error.path} ({error.reason})")
    log(f"{len(result.flagged)} of {len(result.rows)} photos flagged as likely label errors in {result.seconds:.1f} s; "
        f"most suspicious first:")
    for row in result.rows[: min(10, len(result.rows))]:
        log(f"  {row.path}: labelled {row.given_label}, looks {row.suggested_label} "
            f"(p({row.given_label}) = {row.given_label_probability:.4f}){' [flagged]' if row.label_issue else ''}")
    log(f"wrote {output} (every photo, most suspicious first) and {grid} (the top {min(config.shown, len(result.rows))})")
    return 0
