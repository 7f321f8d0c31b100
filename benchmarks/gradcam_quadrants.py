"""Does the Grad-CAM heatmap point at the cat? Share of the heatmap's mass in the quadrant a cat photo is pasted into.

Each cat photo (cat.1001.jpg onwards in ../shared/data/dogs-vs-cats/train) is resized to 224 x 224 and pasted into
each quadrant of a plain grey 448 x 448 canvas; `catdog explain`'s heatmap of the predicted class is summed per
quadrant. A heatmap that ignored the photo would put 25% there. Printed per model: the mean share, the share of
canvases with at least 60% there (the test's bar), how often the canvas was called a cat, and the same for the
cat class's heatmap whatever was predicted. Baseline in the same run: the same heatmaps without the receptive-field
offset correction (`explain.feature_map_offset`), i.e. plain Captum upsampling.

    python benchmarks/gradcam_quadrants.py [--photos 25] [--run RUN ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, require_shared_data  # noqa: E402

from catdog.runtime.explain import load_explainer  # noqa: E402
from catdog.runtime.images import load_image  # noqa: E402


def quadrant_canvas(photo: Image.Image, quadrant: int, side: int = 448) -> Image.Image:
    canvas = Image.new("RGB", (side, side), (128, 128, 128))
    half = side // 2
    canvas.paste(photo.resize((half, half)), ((quadrant % 2) * half, (quadrant // 2) * half))
    return canvas


def share_in(heatmap: np.ndarray, quadrant: int) -> float:
    half = heatmap.shape[0] // 2
    rows = slice(0, half) if quadrant < 2 else slice(half, None)
    columns = slice(0, half) if quadrant % 2 == 0 else slice(half, None)
    total = heatmap.sum()
    return float(heatmap[rows, columns].sum() / total) if total > 0 else 0.0


def measure(explainer, photos: list[Image.Image]) -> dict[str, float]:
    cat = explainer.class_names.index("cat")
    predicted, cat_class, called_cat = [], [], []
    started = time.perf_counter()
    for photo in photos:
        for quadrant in range(4):
            canvas = quadrant_canvas(photo, quadrant)
            explanation = explainer.explain(canvas)
            predicted.append(share_in(explanation.heatmap, quadrant))
            called_cat.append(explanation.label == "cat")
            cat_class.append(predicted[-1] if called_cat[-1] else share_in(explainer.explain(canvas, target=cat).heatmap, quadrant))
    predicted, cat_class = np.array(predicted), np.array(cat_class)
    return {"mean": predicted.mean(), "at_least_60": (predicted >= 0.6).mean(), "called_cat": np.mean(called_cat),
            "cat_mean": cat_class.mean(), "cat_at_least_60": (cat_class >= 0.6).mean(),
            "seconds_per_explanation": (time.perf_counter() - started) / (len(photos) * 4 * (2 - np.mean(called_cat)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=25, help="cat photos, from cat.1001.jpg on")
    parser.add_argument("--run", nargs="*", default=["/tmp/explain-default"], help="runs to measure besides the built-in model")
    arguments = parser.parse_args()
    train = require_shared_data() / "train"
    photos = [load_image(train / f"cat.{number}.jpg") for number in range(1001, 1001 + arguments.photos)]
    print(f"Grad-CAM quadrant test: {len(photos)} cat photos x 4 quadrants; {machine_description()}")
    print(f"{'model':42s} {'variant':22s} {'mean share':>10s} {'>= 60%':>7s} {'called cat':>10s} "
          f"{'cat-class mean':>14s} {'>= 60%':>7s} {'s/explain':>9s}")
    for run in [""] + [r for r in arguments.run if Path(r).is_dir()]:
        explainer = load_explainer(run, device="cpu")
        name = run or "built-in zero-training (Lite0, 224 px)"
        offset = explainer.map_offset
        for variant in ("offset corrected", "plain upsampling"):
            explainer.map_offset = offset if variant == "offset corrected" else (0.0, 0.0)
            figures = measure(explainer, photos)
            print(f"{name[-42:]:42s} {variant:22s} {figures['mean']:10.3f} {figures['at_least_60']:7.2f} "
                  f"{figures['called_cat']:10.2f} {figures['cat_mean']:14.3f} {figures['cat_at_least_60']:7.2f} "
                  f"{figures['seconds_per_explanation']:9.3f}")
        print(f"{'':42s} measured offset (rows, columns) {offset[0]:+.1f}, {offset[1]:+.1f} px at "
              f"{explainer.meta.preprocess.input_size} px input")


if __name__ == "__main__":
    main()
