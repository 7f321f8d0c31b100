"""Teaching "neither" (#25), the research behind `catdog train --neither`: how to use the user's examples of what is
none of the classes, compared on the cached features of a default run.

A default-preset run trained on the shared Kaggle photos (`--run`, e.g. benchmarks/neither.py's baseline) gives
the frozen backbone, its training/validation split and the automatic score (its k-NN bank and threshold). Every
photo's first view comes from catdog's feature cache (computed on the way when missing): the run's training and
validation photos, dogs-vs-cats-originals, not-pets and not-pets-near. Each species folder of not-pets-near is
cut in halves by content (`neither.halves`, as benchmarks/neither.py cuts them); the taught half of every species
is what a user would give with --neither.

Ways of using the examples, each chosen to keep a share of the validation photos (which no bank holds):
- `knn k=K keep=X`: a second k-NN bank of the examples (`ood.KnnScorer`, its own 256 principal directions); a
  photo is "neither" when its automatic score is above the threshold or when it is nearer the examples than the
  training photos by more than a margin (ood_score - distance to the K-th nearest example > margin), the margin
  keeping a share X of the validation photos;
- `knn k=1 margin 0`: the same with a fixed margin of zero (nearer the examples than the pets);
- `logistic C=C keep=X`: an extra output of the head (a logistic regression of pets' training photos against the
  examples on the L2-normalised features, balanced), its threshold keeping X of the validation photos;
- `shipped`: what `catdog train --neither` does (`catdog.training.neither.TaughtNeither`): the logistic head at
  `--neither-keep` (99.8%) and a k = 1 bank whose margin keeps every validation photo.
Measured for each: the other half of every species accepted (the whole rule), leave-one-species-out (the taught
halves of the other species only, measured on every photo of the species left out), pets refused on the validation
photos and on dogs-vs-cats-originals, not-pets accepted.

    python benchmarks/neither_research.py --run /tmp/catdog-neither/baseline [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_description  # noqa: E402
from neither import halves, species_folders  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def first_views(paths: list[Path], model, meta) -> np.ndarray:
    """Each photo's first-view feature vector [N, D] from the feature cache (NaN rows for unreadable files)."""
    from catdog.training.features import extract_features

    feature_set = extract_features(paths, lambda: model.backbone, meta.model_name, meta.preprocess, ("original",))
    return feature_set.features[:, 0]


def knn_method(k: int, keep: float | None):
    """fit(taught, validation) -> (score(features) -> refused bool), the k-NN bank with a margin (None: zero)."""
    from catdog.runtime.probabilities import taught_advantage, threshold_keeping
    from catdog.training.ood import KNN_DIMENSIONS, KnnScorer

    def fit(taught: np.ndarray, pets, validation: np.ndarray, validation_scores: np.ndarray):
        bank = KnnScorer.fit(taught, k=k, bank_size=len(taught), dimensions=KNN_DIMENSIONS)
        margin = 0.0 if keep is None else threshold_keeping(taught_advantage(validation_scores, bank.scores(validation)), keep)
        return lambda features, scores: taught_advantage(scores, bank.scores(features)) > margin

    return fit


def logistic_method(keep: float, c: float = 1.0):
    from sklearn.linear_model import LogisticRegression

    from catdog.runtime.probabilities import threshold_keeping
    from catdog.training.ood import normalised

    def fit(taught: np.ndarray, pets: np.ndarray, validation: np.ndarray, validation_scores: np.ndarray):
        inputs = normalised(np.r_[pets, taught].astype(np.float32))
        targets = np.r_[np.zeros(len(pets)), np.ones(len(taught))]
        head = LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(inputs, targets)
        threshold = threshold_keeping(head.decision_function(normalised(validation)), keep)
        return lambda features, scores: head.decision_function(normalised(features)) > threshold

    return fit


def shipped_method():
    """`catdog train --neither` as shipped: `TaughtNeither` with the default --neither-keep."""
    from catdog.runtime.probabilities import taught_refusals
    from catdog.training.config import NEITHER_KEEP
    from catdog.training.neither import TaughtNeither

    def fit(taught: np.ndarray, pets: np.ndarray, validation: np.ndarray, validation_scores: np.ndarray):
        rule, _ = TaughtNeither.fit(taught, pets)
        threshold, margin = rule.choose(validation, validation_scores, NEITHER_KEEP)

        def refused(features, scores):
            head, distances, _ = rule.outputs(features)
            return taught_refusals(scores, distances, margin, head, threshold)

        return refused

    return fit


METHODS = {
    "knn k=1 keep=0.995": knn_method(1, 0.995),
    "knn k=1 keep=0.99": knn_method(1, 0.99),
    "knn k=1 keep=0.998": knn_method(1, 0.998),
    "knn k=3 keep=0.995": knn_method(3, 0.995),
    "knn k=5 keep=0.995": knn_method(5, 0.995),
    "knn k=1 margin 0": knn_method(1, None),
    "logistic C=1 keep=0.995": logistic_method(0.995),
    "logistic C=1 keep=0.997": logistic_method(0.997),
    "logistic C=1 keep=0.998": logistic_method(0.998),
    "logistic C=0.3 keep=0.998": logistic_method(0.998, 0.3),
    "logistic C=3 keep=0.998": logistic_method(0.998, 3.0),
    "logistic C=1 keep=0.999": logistic_method(0.999),
    "shipped (logistic C=1 keep=0.998 + k=1 bank above every validation photo)": shipped_method(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a default-preset run on the shared Kaggle photos")
    parser.add_argument("--markdown", default="", help="also write the tables to this file")
    arguments = parser.parse_args()
    from catdog.training.checkpoint import load_model
    from catdog.training.ood import KnnScorer

    started = time.perf_counter()
    run = Path(arguments.run)
    model, meta = load_model(run)
    split = json.loads((run / "split.json").read_text())
    root = Path(split["root"])
    pets_train = first_views([root / p for p in split["train"]], model, meta)
    validation = first_views([root / p for p in split["val"]], model, meta)
    originals = first_views(sorted((SHARED / "dogs-vs-cats-originals").glob("*.jpg")), model, meta)
    not_pets = first_views(sorted((SHARED / "not-pets").rglob("*.jpg")), model, meta)
    near = {name: first_views(paths, model, meta) for name, paths in species_folders(SHARED / "not-pets-near").items()}
    cut = {name: halves(paths) for name, paths in species_folders(SHARED / "not-pets-near").items()}
    taught = {name: near[name][np.array([i in set(cut[name][0]) for i in range(len(near[name]))])] for name in near}
    held = {name: near[name][np.array([i in set(cut[name][1]) for i in range(len(near[name]))])] for name in near}
    clean = lambda features: features[~np.isnan(features).any(axis=1)]  # noqa: E731
    pets_train, validation, originals, not_pets = map(clean, (pets_train, validation, originals, not_pets))
    taught, held, near = ({n: clean(f) for n, f in d.items()} for d in (taught, held, near))
    pets = KnnScorer.load(run / "ood.safetensors")
    threshold = meta.ood_threshold
    scored = {name: pets.scores(features) for name, features in
              [("validation", validation), ("originals", originals), ("not_pets", not_pets)]}
    held_scores = {name: pets.scores(features) for name, features in held.items()}
    near_scores = {name: pets.scores(features) for name, features in near.items()}
    print(f"features in {time.perf_counter() - started:.0f} s; taught {sum(map(len, taught.values()))}, "
          f"held {sum(map(len, held.values()))}", flush=True)

    species = sorted(near)
    rows = [["automatic score alone"] + [f"{(held_scores[s] <= threshold).mean():.1%}" for s in species]
            + ["", f"{(scored['validation'] > threshold).mean():.2%}", f"{(scored['originals'] > threshold).mean():.2%}",
               f"{(scored['not_pets'] <= threshold).mean():.2%}"]]
    loso_rows = [["automatic score alone"] + [f"{(near_scores[s] <= threshold).mean():.1%}" for s in species]]
    for name, fit in METHODS.items():
        rule = fit(np.concatenate([taught[s] for s in species]), pets_train, validation, scored["validation"])

        def accepted(features, scores):
            return ~(rule(features, scores) | (scores > threshold))

        held_accepted = [accepted(held[s], held_scores[s]).mean() for s in species]
        rows.append([name] + [f"{value:.1%}" for value in held_accepted]
                    + [f"{max(held_accepted):.1%}",
                       f"{1 - accepted(validation, scored['validation']).mean():.2%}",
                       f"{1 - accepted(originals, scored['originals']).mean():.2%}",
                       f"{accepted(not_pets, scored['not_pets']).mean():.2%}"])
        loso = []
        for left_out in species:
            without = fit(np.concatenate([taught[s] for s in species if s != left_out]), pets_train, validation, scored["validation"])
            loso.append(float((~(without(near[left_out], near_scores[left_out]) | (near_scores[left_out] > threshold))).mean()))
        loso_rows.append([name] + [f"{value:.1%}" for value in loso])
        print(f"{name}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    header = "| | " + " | ".join(species)
    lines = [f"Measured on {machine_description()}; run {run} (validation {len(validation)} photos, originals "
             f"{len(originals)}, not-pets {len(not_pets)}).", "",
             "Trained with the taught half of every species, the other half accepted (the whole rule), and pets:", "",
             header + " | worst | validation refused | originals refused | not-pets accepted |",
             "| --- |" + " ---: |" * (len(species) + 4)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Leave-one-species-out: trained with the taught halves of the other species, every photo of the "
              "species left out accepted:", "", header + " |", "| --- |" + " ---: |" * len(species)]
    lines += ["| " + " | ".join(row) + " |" for row in loso_rows]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if arguments.markdown:
        Path(arguments.markdown).write_text(text)


if __name__ == "__main__":
    main()
