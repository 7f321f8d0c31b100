"""Grad-CAM: which part of a photo made the model decide (`catdog explain`, `POST /explain`, the report, the
notebook). Runtime layer: NumPy and Pillow on the exported file's "class_maps" output, never torch.

The exported file computes each class's Grad-CAM map in closed form (see `catdog.training.export`, which also checks it
against autograd's in the tests). Here the map is upsampled to the model's input crop and placed where that crop
lies in the photo, shifted by where a map cell really looks (`heatmap_offset`, measured at export), so the heatmap
is over the photo as the user sees it. Runs validated with mirror-image averaging are explained the same way: the
photo and its mirror image are both explained for the same class and the mirrored map is flipped back and
averaged in, and the probabilities are the averaged, temperature-scaled ones `catdog predict` reports.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from catdog.runtime.config import ExplainConfig
from catdog.runtime.files import write_bytes_atomic, write_csv_atomic
from catdog.runtime.images import ImageLoadError, load_image
from catdog.runtime.predict import EXIT_SOME_FILES_FAILED, Predictor, collect_inputs
from catdog.runtime.probabilities import softmax
from catdog.runtime.runs import RunError

OVERLAY_OPACITY = 0.5  # share of the heatmap colour in the overlay; the photo stays readable under it
OVERLAY_MAX_SIDE = 800  # overlays of larger photos are scaled down to this longer side

# matplotlib's "jet" colormap (blue cold, red hot) as its own piecewise-linear segments, so that drawing an
# overlay needs no matplotlib: (position, value) per channel.
JET_SEGMENTS = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)


@dataclass
class Explanation:
    """The predicted class of one photo, its probabilities and where in the photo the evidence for it lies.

    heatmap: [photo height, photo width] in [0, 1], 1 at the strongest evidence; 0 outside the centre crop the model
    saw. probabilities: calibrated, one per class, in `class_names` order.
    """

    class_names: list[str]
    probabilities: np.ndarray
    heatmap: np.ndarray
    photo: Image.Image
    ood_score: float | None = None  # how unlike the training photos (None: the model has no score)
    in_distribution: bool = True  # False: "neither"; `label` is then only the nearest class
    # A model taught examples of "neither" (`catdog train --neither`): the distance to them, the nearest one's index
    # in the bank, and the decision's reason and example (`predict.Decision`); None / "" otherwise; their head's score
    neither_distance: float | None = None
    nearest_neither_index: int | None = None
    refused_by: str = ""
    nearest_neither: str = ""
    neither_score: float | None = None

    @property
    def label(self) -> str:
        return self.class_names[int(self.probabilities.argmax())]

    @property
    def confidence(self) -> float:
        return float(self.probabilities.max())

    def overlay(self, max_side: int = OVERLAY_MAX_SIDE) -> Image.Image:
        return heatmap_overlay(self.photo, self.heatmap, max_side)

    def overlay_png(self, max_side: int = OVERLAY_MAX_SIDE) -> bytes:
        buffer = io.BytesIO()
        self.overlay(max_side).save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()

    def _repr_png_(self) -> bytes:  # a notebook shows the overlay
        return self.overlay_png()


def explain_photo(predictor: Predictor, photo: Image.Image, tta: bool | None = None, target: int | None = None,
                  check_orientation: bool = False) -> Explanation:
    """Grad-CAM of `target` (default: the predicted class) for one RGB photo. A photo that `predict` would read
    turned a quarter (`Predictor.upright`) is explained turned the same way, and its map turned back onto it."""
    if not predictor.has_heatmaps:
        raise RunError(f"{predictor.source or predictor.model_name}: this model file has no heatmaps (class_maps "
                       "output); export it again with `catdog export` (networks without a pooled convolutional map, "
                       "such as vision transformers, have none)")
    image = predictor.transform(photo)[None]
    outputs = predictor.network.run(image, ("logits", "class_maps") + predictor.score_outputs)
    logits, maps = outputs["logits"][0], outputs["class_maps"][0]
    ood_score = float(outputs["ood_score"][0]) if "ood_score" in outputs else None
    neither_distance = float(outputs["neither_distance"][0]) if "neither_distance" in outputs else None
    neither_score = float(outputs["neither_score"][0]) if "neither_score" in outputs else None
    nearest_index = int(outputs["nearest_neither"][0]) if "nearest_neither" in outputs else None
    turn = 0
    if check_orientation and ood_score is not None:
        turned, _, turns = predictor.upright(image, logits[None], np.array([ood_score], dtype=np.float32))
        turn = int(turns[0])
        if turn:
            image = turned
            outputs = predictor.network.run(image, ("logits", "class_maps"))
            logits, maps = outputs["logits"][0], outputs["class_maps"][0]
    if predictor.uses_mirror_view(softmax(logits[None] / predictor.temperature), tta)[0]:
        mirrored = predictor.network.run(np.ascontiguousarray(image[..., ::-1]), ("logits", "class_maps"))
        logits = (logits + mirrored["logits"][0]) / 2
        maps = (maps + mirrored["class_maps"][0][..., ::-1]) / 2
    if turn:  # back onto the photo as the user sees it (the heatmap offset, a fraction of a cell, is not turned)
        maps = np.rot90(maps, -turn, axes=(1, 2))
    probabilities = softmax(logits[None] / predictor.temperature)[0]
    target = int(probabilities.argmax()) if target is None else target
    size = predictor.preprocess.input_size
    crop_map = np.asarray(Image.fromarray(maps[target].astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR))
    left, top, right, bottom = predictor.transform.crop_box(*photo.size)
    offset_rows, offset_columns = predictor.heatmap_offset
    shift_x, shift_y = offset_columns * (right - left) / size, offset_rows * (bottom - top) / size
    heatmap = place_on_photo(crop_map, (left + shift_x, top + shift_y, right + shift_x, bottom + shift_y), photo.size)
    decision = predictor.decide(ood_score, neither_distance, nearest_index, neither_score)
    return Explanation(predictor.class_names, probabilities, heatmap, photo, ood_score, decision.in_distribution,
                       neither_distance, nearest_index, decision.refused_by, decision.nearest_neither, neither_score)


def place_on_photo(crop_map: np.ndarray, box: tuple[float, float, float, float], photo_size: tuple[int, int]) -> np.ndarray:
    """A map over the model's input crop, resized to the crop's box in the photo and scaled to [0, 1]."""
    width, height = photo_size
    left, top, right, bottom = (int(round(v)) for v in box)
    left, top, right, bottom = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    heatmap = np.zeros((height, width), dtype=np.float32)
    if right > left and bottom > top:
        resized = Image.fromarray(crop_map.astype(np.float32), mode="F").resize((right - left, bottom - top), Image.Resampling.BILINEAR)
        heatmap[top:bottom, left:right] = np.maximum(np.asarray(resized), 0)
    peak = heatmap.max()
    return heatmap / peak if peak > 0 else heatmap


def jet(values: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] for values in [0, 1]: matplotlib's "jet"."""
    values = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(values, *zip(*segments)) for segments in JET_SEGMENTS], axis=-1)


def heatmap_overlay(photo: Image.Image, heatmap: np.ndarray, max_side: int = OVERLAY_MAX_SIDE) -> Image.Image:
    """The photo with the heatmap blended over it (blue cold, red hot)."""
    scale = min(1.0, max_side / max(photo.size))
    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    pixels = np.asarray(photo.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255
    heat = np.asarray(Image.fromarray(heatmap.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
    blended = (1 - OVERLAY_OPACITY) * pixels + OVERLAY_OPACITY * jet(heat)
    return Image.fromarray(np.clip(blended * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- the command


def overlay_file_names(paths: Sequence[Path]) -> list[str]:
    """`<stem>.gradcam.png` per photo; photos sharing a stem (same name in different folders) get -2, -3 ..."""
    names, seen = [], {}
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        suffix = "" if seen[path.stem] == 1 else f"-{seen[path.stem]}"
        names.append(f"{path.stem}{suffix}.gradcam.png")
    return names


def run_explain(config: ExplainConfig, predictor: Predictor, log: Callable[[str], None] = print) -> int:
    """Explain every readable photo; return the exit code (0, or EXIT_SOME_FILES_FAILED when some could not be read)."""
    paths, problems = collect_inputs(config.paths)
    output = Path(config.output)
    log(f"explaining {len(paths)} photos with {predictor.describe()}")
    started = time.perf_counter()
    header = ["path", "label", "confidence"] + [f"prob_{name}" for name in predictor.class_names] + ["overlay"]
    rows, failures = [], [(path, why) for path, why in problems]
    for path, overlay_name in zip(paths, overlay_file_names(paths)):
        try:
            photo = load_image(path)
        except ImageLoadError as error:
            failures.append((str(path), f"{error.reason}" + (f" ({error.detail})" if error.detail else "")))
            continue
        explanation = explain_photo(predictor, photo, config.tta, check_orientation=config.check_orientation)
        write_bytes_atomic(output / overlay_name, explanation.overlay_png())
        rows.append([str(path), explanation.label, f"{explanation.confidence:.6f}"]
                    + [f"{p:.6f}" for p in explanation.probabilities] + [overlay_name])
    write_csv_atomic(output / "explanations.csv", header, rows)
    for path, why in failures:
        print(f"error: {path}: {why}", file=sys.stderr)
    log(f"wrote {len(rows)} Grad-CAM overlays and explanations.csv to {output} in {time.perf_counter() - started:.1f} s"
        + (f"; {len(failures)} could not be read" if failures else ""))
    return EXIT_SOME_FILES_FAILED if failures else 0
