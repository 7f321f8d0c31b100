"""Common damage to photos, for measuring (and training) robustness: `catdog evaluate --corruptions`.

After ImageNet-C (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019): a fixed set of kinds of damage, each at stated severities, applied to the validation
photos, and accuracy and log loss under each. The kinds here are the damage photos of pets really arrive with:
re-compressed JPEGs, thumbnails, blur, black-and-white and under-exposed shots, sensor noise, a photo inside a
screenshot, and a phone photo turned sideways whose EXIF orientation tag was lost.

Runtime layer: Pillow and NumPy only. Every function is `function(image, severity, rng) -> image` on RGB PIL
images, and deterministic given its generator; `damage` seeds the generator from (the photo's key, kind,
severity), the key being the file's content digest (`features.file_digest`) or its index, so a photo gets the
same damage in every run, process and machine.

Severities are in each kind's own physical unit (JPEG quality, pixels, a share of the short side, ...) and stated
in one place, `SEVERITIES`, with the reasons; `TRAINING_RANGES` are the wider ranges the damaged training views
draw from (see `training_damage`), so the head is never trained at the exact severities it is tested at.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Corruption = Callable[[Image.Image, float, np.random.Generator], Image.Image]


def jpeg(image: Image.Image, quality: float, rng: np.random.Generator) -> Image.Image:
    """Re-encoded as a JPEG at `quality` (1-95, Pillow's scale; 4:2:0 chroma subsampling, its default)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(round(quality)))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def thumbnail(image: Image.Image, short_side: float, rng: np.random.Generator) -> Image.Image:
    """Shrunk so that its short side is `short_side` pixels (antialiased): a thumbnail or a chat app's preview.
    The model's transform scales it back up, as it would any small photo."""
    width, height = image.size
    scale = short_side / min(width, height)
    if scale >= 1:
        return image.copy()
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)


def blur(image: Image.Image, radius_share: float, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur (defocus, camera shake) of radius `radius_share` x the short side (Pillow's radius is the
    Gaussian's standard deviation), so the damage looks the same at any resolution."""
    return image.filter(ImageFilter.GaussianBlur(radius_share * min(image.size)))


def grey(image: Image.Image, amount: float, rng: np.random.Generator) -> Image.Image:
    """Colour removed: 1 is black-and-white (ITU-R 601 luma, Pillow's "L"), 0.5 half-way (faded colours)."""
    luma = image.convert("L").convert("RGB")
    return Image.blend(image, luma, float(amount))


def dark(image: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    """Under-exposed: every pixel value times `factor` (rounded to 8 bits, so shadow detail is lost as it is in a
    dark JPEG)."""
    pixels = np.asarray(image, dtype=np.float32) * float(factor)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Sensor noise: independent Gaussian noise of standard deviation `sigma` (of 255) on every pixel and channel."""
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, float(sigma), size=(image.height, image.width, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def screenshot(image: Image.Image, width_share: float, rng: np.random.Generator) -> Image.Image:
    """The photo inside a screenshot: a 16:10 page (light background, a title bar, grey lines of "text") on which
    the photo takes `width_share` of the width, at a random place that keeps it inside the centred square the
    model's transform crops (a photo the crop cut off would be another kind of damage)."""
    width, height = image.size
    canvas_width = max(width + 2, round(width / width_share))
    canvas_height = max(height + 2, round(canvas_width * 10 / 16))
    shade = int(rng.integers(225, 256))
    canvas = Image.new("RGB", (canvas_width, canvas_height), (shade, shade, shade))
    draw = ImageDraw.Draw(canvas)
    bar = max(2, canvas_height // 14)
    bar_colour = tuple(int(v) for v in rng.integers(30, 90, size=3))
    draw.rectangle((0, 0, canvas_width, bar), fill=bar_colour)
    line = max(2, canvas_height // 40)
    for top in range(bar + 2 * line, canvas_height - line, 3 * line):
        draw.rectangle((line * 2, top, line * 2 + int(rng.uniform(0.3, 0.95) * (canvas_width - 4 * line)), top + line),
                       fill=(150, 150, 150))
    side = min(canvas_width, canvas_height)  # the centred square the model sees
    low_x, high_x = (canvas_width - side) // 2, (canvas_width + side) // 2 - width
    left = int(rng.integers(low_x, high_x + 1)) if high_x >= low_x else (canvas_width - width) // 2
    top = int(rng.integers(bar, max(bar, canvas_height - height) + 1))
    canvas.paste(image, (left, min(top, canvas_height - height)))
    return canvas


def sideways(image: Image.Image, degrees: float, rng: np.random.Generator) -> Image.Image:
    """Turned by `degrees` counter-clockwise (90 or 270): a phone photo whose EXIF orientation tag was stripped."""
    turns = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    return image.transpose(turns[int(degrees) % 360]) if int(degrees) % 360 else image.copy()


KINDS: dict[str, Corruption] = {
    "jpeg": jpeg, "thumbnail": thumbnail, "blur": blur, "grey": grey, "dark": dark, "noise": noise,
    "screenshot": screenshot, "sideways": sideways,
}


@dataclass(frozen=True)
class Severities:
    unit: str
    mild: float
    strong: float
    why: str


# The two severities each kind is measured at (issue 17: never tune to one severity). The stronger is the issue's
# acceptance severity (its floor, in `why`); the milder is damage as common, less of it.
SEVERITIES: dict[str, Severities] = {
    "jpeg": Severities("JPEG quality", 30, 15, "30: a messaging app's re-compression; 15 (issue: <= 15): blocky, "
                       "colour bleeding, about ImageNet-C's JPEG severity 4"),
    "thumbnail": Severities("px on the short side", 128, 96, "128: a gallery thumbnail; 96 (issue: <= 100): a chat "
                            "preview or a small avatar, half the 200-px photos' side"),
    "blur": Severities("Gaussian sigma / short side", 0.004, 0.008, "0.4%: slightly soft focus; 0.8% (issue: "
                       ">= 0.8%): 1.6 px on a 200-px photo, about ImageNet-C's blur severity 2 (sigma 2 px at 224 px)"),
    "grey": Severities("share of colour removed", 0.5, 1.0, "0.5: faded colours; 1: a black-and-white photo"),
    "dark": Severities("brightness factor", 0.6, 0.35, "0.6: a dim room; 0.35 (issue): badly under-exposed, shadow "
                       "detail lost to 8 bits"),
    "noise": Severities("sigma of 255", 12, 25, "12: a phone in low light; 25 (issue: >= 25): heavy grain, about "
                        "ImageNet-C's Gaussian noise severity 3"),
    "screenshot": Severities("photo width / page width", 0.75, 0.55, "0.75: a photo filling most of a page; 0.55 "
                             "(issue: <= 55%): a photo in a column of a web page or chat window"),
    "sideways": Severities("degrees counter-clockwise", 270, 90, "both are a quarter turn (the issue's 90 degrees), "
                           "one each way: a phone held either way round, its EXIF tag lost"),
}

# The ranges damaged training views draw severities from (uniformly; sideways: either turn): wider than both
# measured severities on each side, so the head learns the kind, not one setting of it.
TRAINING_RANGES: dict[str, tuple[float, float]] = {
    "jpeg": (6, 50), "thumbnail": (56, 160), "blur": (0.003, 0.02), "grey": (0.4, 1.0), "dark": (0.22, 0.75),
    "noise": (5, 45), "screenshot": (0.3, 0.85), "sideways": (90, 270),
}


def generator(key: str | int, kind: str, severity: float | str) -> np.random.Generator:
    """The generator for one photo's damage: seeded by (its key, the kind, the severity)."""
    digest = hashlib.sha256(f"{key}|{kind}|{severity}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def damage(image: Image.Image, kind: str, severity: float, key: str | int) -> Image.Image:
    """`image` (RGB) with one kind of damage at `severity`, the same for the same key every time."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of damage {kind!r}; choose one of {', '.join(KINDS)}")
    return KINDS[kind](image.convert("RGB"), severity, generator(key, kind, severity))


def training_damage(image: Image.Image, key: str | int, draw: str) -> tuple[Image.Image, str, float]:
    """A damaged training view: a kind drawn uniformly, a severity drawn from its `TRAINING_RANGES`, and a mirror
    image half of the time, all seeded by (the photo's key, `draw`: the view's name), so each view of a photo is
    an independent, reproducible draw. Returns the image, the kind and the severity."""
    rng = generator(key, "training", draw)
    kind = list(KINDS)[int(rng.integers(len(KINDS)))]
    low, high = TRAINING_RANGES[kind]
    severity = float(rng.choice([90, 270])) if kind == "sideways" else float(rng.uniform(low, high))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return KINDS[kind](image.convert("RGB"), severity, rng), kind, severity


def conditions(severity: str = "both") -> list[tuple[str, float]]:
    """The (kind, severity) pairs measured: "strong", "mild" or "both" (strong first for each kind)."""
    chosen = []
    for kind, levels in SEVERITIES.items():
        if severity in ("strong", "both"):
            chosen.append((kind, levels.strong))
        if severity in ("mild", "both"):
            chosen.append((kind, levels.mild))
    return chosen


def condition_name(kind: str, severity: float) -> str:
    """A condition's name, also its feature-cache view name: "jpeg@10", "blur@0.012"."""
    return f"{kind}@{severity:g}"


def parse_condition(name: str) -> tuple[str, float]:
    kind, _, severity = name.partition("@")
    if kind not in KINDS or not severity:
        raise ValueError(f"not a kind of damage at a severity: {name!r} (e.g. jpeg@10; kinds: {', '.join(KINDS)})")
    return kind, float(severity)
