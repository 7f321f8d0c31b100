"""The mirror view photo by photo, clean and under each strong damage, from a head run's cached features (issue 24).

    python benchmarks/mirror_view_per_photo.py --run RUN --data LABELLED_DIR [--compare none,off] [--cache-dir DIR]

Scores the labelled photos (Kaggle naming) as `catdog evaluate --corruptions` does (its cached-feature scorer, the
same damaged pixels), with two mirror settings: "none" (the run's rule: the mirror view below its mirror_below
confidence), "off" (never) or "all" (every photo). For each condition: accuracy and log loss of both, answers changed,
right -> wrong, wrong -> right and right -> wrong at a new confidence >= 0.9. Features missing from the cache are
computed (minutes for a cold cache).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from catdog.training import corruptions
from catdog.training.config import EvaluateConfig
from catdog.training.evaluate import _CachedHeadScorer

SETTINGS = {"none": None, "off": False, "all": True}  # the tta value of each setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--compare", default="none,off", help="RULE,BASELINE among none, off, all")
    parser.add_argument("--cache-dir", default="")
    arguments = parser.parse_args()
    rule, baseline = arguments.compare.split(",")
    paths = sorted(arguments.data.glob("*.jpg"))
    labels = np.array([0 if path.name.startswith("cat") else 1 for path in paths])
    scorer = _CachedHeadScorer(Path(arguments.run), EvaluateConfig(run=arguments.run, cache_dir=arguments.cache_dir))

    def probabilities(condition: str | None, setting: str) -> np.ndarray:
        indices, values = scorer.score(paths, condition, SETTINGS[setting], False)
        full = np.full((len(paths), 2), np.nan)
        full[indices] = values
        return full

    def log_loss(values: np.ndarray) -> float:
        return float(-np.log(np.clip(values[np.arange(len(labels)), labels], 1e-15, 1)).mean())

    print(f"{len(paths)} photos; mirror view {rule!r} against {baseline!r}")
    conditions = [None] + [corruptions.condition_name(kind, s.strong) for kind, s in corruptions.SEVERITIES.items()]
    for condition in conditions:
        before, after = probabilities(condition, baseline), probabilities(condition, rule)
        right_before, right_after = before.argmax(1) == labels, after.argmax(1) == labels
        confident_wrong = right_before & ~right_after & (after.max(1) >= 0.9)
        print(f"{condition or 'clean':<16} {baseline}: {right_before.mean():.4f} / {log_loss(before):.4f}  "
              f"{rule}: {right_after.mean():.4f} / {log_loss(after):.4f}  changed {int((before.argmax(1) != after.argmax(1)).sum())} "
              f"r->w {int((right_before & ~right_after).sum())} w->r {int((~right_before & right_after).sum())} "
              f"r->w at >= 0.9 {int(confident_wrong.sum())}")


if __name__ == "__main__":
    main()
