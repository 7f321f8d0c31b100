"""Folder prediction throughput of a default run against the tutorial's one-photo-at-a-time loop, with the
accuracy check of predict's mirror-view scheme.

End to end, from JPEG files on disk to the CSV, process start included for catdog (a fresh `catdog predict`
process per measurement, after one untimed warm-up run that fills the ONNX cache as a first use would); the
tutorial loop runs in this process (its imports already paid), as before. Input: the 500 test1 photos upscaled to
Kaggle's typical original size (500x375). Contenders, interleaved over `--rounds` rounds (the median is reported,
since the machine may be shared):
- `catdog predict --run RUN FOLDER`: a default run (Lite2 features at 300 px, validated with mirror averaging), as
  a user runs it;
- the same with `--tta` (the mirror view for every photo);
- the tutorial's loop with its ResNet-18 (the reference), on the first `--tutorial-limit` photos.
Besides images/s (wall clock), CPU seconds per photo (this process and its children), which a busy machine moves
less than wall time.

Accuracy: on the run's validation split (1,200 shared photos), accuracy and log loss of the mirror view for every
photo against predict's scheme (the mirror view only below the run's `mirror_below` first-view confidence); on the
unseen test1 photos, how often the two agree. Profile: where a photo's time goes (start-up, decoding,
preprocessing, first-view inference at 1 and 64 photos per batch, the share of photos given the mirror view).

    python benchmarks/predict_throughput.py [--run RUN] [--rounds 2] [--tutorial-limit N]
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CATDOG, machine_description, require_shared_data, run_timed  # noqa: E402


def tutorial_model(name: str):
    """The network the tutorial's loop runs, and its preprocessing.

    resnet18: the tutorial's transfer-learning model (torchvision ResNet-18 with a 2-class head). Its ImageNet
        weights are not available offline here, so it runs with random weights: the arithmetic, and so the speed,
        is the same.
    """
    import torchvision

    from catdog.runtime.transforms import Preprocess

    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Linear(512, 2)
    return model, Preprocess(224, 0.875)


def tutorial_predict_image_loop(folder: Path, output: Path, limit: int | None = None, model_name: str = "resnet18") -> tuple[float, int]:
    """The tutorial's predict_image: open, transform, one forward pass per image, eager PyTorch; then the CSV."""
    from torchvision import transforms

    started = time.perf_counter()
    model, preprocess = tutorial_model(model_name)
    model.eval()
    transform = transforms.Compose([transforms.Resize(preprocess.resize_size), transforms.CenterCrop(preprocess.input_size),
                                    transforms.ToTensor(), transforms.Normalize(preprocess.mean, preprocess.std)])
    paths = sorted(folder.glob("*.jpg"))[:limit]
    rows = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        with torch.no_grad():
            probabilities = torch.softmax(model(transform(image).unsqueeze(0)), dim=1)[0]
        rows.append((str(path), ["cat", "dog"][int(probabilities.argmax())], float(probabilities.max())))
    with open(output, "w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    return time.perf_counter() - started, len(paths)


def make_resized_photos(source: Path, target: Path, count: int, size: tuple[int, int]) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.jpg"))[:count]:
        Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target / path.name, quality=90)
    return target


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: less sensitive than wall time to a busy machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def catdog_predict(run: Path, folder: Path, output: Path, *options: str) -> tuple[float, int]:
    command = CATDOG + ["predict", "--run", str(run), str(folder), "--output", str(output), "--no-progress", *options]
    seconds, _ = run_timed(command)
    with open(output) as stream:
        return seconds, sum(1 for _ in stream) - 1


def read_probabilities(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as stream:
        return {row["path"]: np.array([float(row["prob_cat"]), float(row["prob_dog"])]) for row in csv.DictReader(stream)}


def train_default_run(data: Path, run: Path) -> Path:
    """A default run (`catdog train` with no preset or model option) from the cached features of the shared photos."""
    seconds, output = run_timed(CATDOG + ["train", "--data", str(data / "train"), "--out", str(run), "--no-progress"])
    print(f"trained the default run in {seconds:.0f} s: {output.strip().splitlines()[-1]}", flush=True)
    return run


def both_views(predictor, paths: list[Path]) -> tuple[np.ndarray, list[int]]:
    """Logits of each photo and of its mirror image, [photos, 2, classes], through the predictor's own model."""
    from catdog.runtime.images import ImageLoadError, load_image

    logits, kept = [], []
    for index, path in enumerate(paths):
        try:
            image = predictor.transform.array(load_image(path, draft_size=predictor.preprocess.resize_size))
        except ImageLoadError:
            continue
        views = np.stack([image, image[..., ::-1]])
        logits.append(predictor.logits(views))
        kept.append(index)
    return np.stack(logits), kept


def scheme_probabilities(view_logits: np.ndarray, temperature: float, mirror_below: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    from catdog.runtime.probabilities import softmax

    everything = softmax(view_logits.mean(axis=1) / temperature)
    first = softmax(view_logits[:, 0] / temperature)
    unsure = first.max(axis=1) < (mirror_below if mirror_below is not None else np.inf)
    return everything, np.where(unsure[:, None], everything, first), float(unsure.mean())


def accuracy_check(run: Path) -> dict:
    from catdog.model_files import open_model

    predictor = open_model(run=str(run))
    split = json.loads((run / "split.json").read_text())
    paths = [Path(split["root"]) / relative for relative in split["val"]]
    labels = np.array([split["class_names"].index(Path(p).name.split(".")[0]) for p in split["val"]])
    view_logits, kept = both_views(predictor, paths)
    labels = labels[kept]
    everything, scheme, share = scheme_probabilities(view_logits, predictor.temperature, predictor.meta.mirror_below)

    def figures(probabilities):
        picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-15, 1.0)
        return float((probabilities.argmax(axis=1) == labels).mean()), float(-np.log(picked).mean())

    return {"photos": len(labels), "mirror_below": predictor.meta.mirror_below, "mirrored_share": share,
            "every_photo": figures(everything), "scheme": figures(scheme)}


def profile(run: Path, folder: Path, scratch: Path) -> dict:
    """Where a photo's time goes, measured in this process (start-up: a fresh process predicting one photo)."""
    from catdog.runtime.images import load_image
    from catdog.model_files import open_model
    from catdog.runtime.probabilities import softmax

    single = scratch / "one"
    single.mkdir(exist_ok=True)
    first_photo = sorted(folder.glob("*.jpg"))[0]
    (single / first_photo.name).write_bytes(first_photo.read_bytes())
    startup = min(catdog_predict(run, single, scratch / "one.csv")[0] for _ in range(3))
    started = time.perf_counter()
    predictor = open_model(run=str(run))
    session_seconds = time.perf_counter() - started
    paths = sorted(folder.glob("*.jpg"))[:64]
    started = time.perf_counter()
    images = [load_image(path, draft_size=predictor.preprocess.resize_size) for path in paths]
    decode = (time.perf_counter() - started) / len(paths)
    started = time.perf_counter()
    arrays = np.stack([predictor.transform.array(image) for image in images])
    preprocess = (time.perf_counter() - started) / len(paths)
    predictor.logits(arrays[:1])
    started = time.perf_counter()
    first_view = np.concatenate([predictor.logits(arrays[i : i + 1]) for i in range(len(arrays))])
    one_at_a_time = (time.perf_counter() - started) / len(paths)
    started = time.perf_counter()
    predictor.logits(arrays)
    batch_of_64 = (time.perf_counter() - started) / len(paths)
    mirror_below = predictor.meta.mirror_below
    confidence = softmax(first_view / predictor.temperature).max(axis=1)
    return {"start-up and one photo (fresh process), s": startup, "ONNX session load, s": session_seconds,
            "decode, ms/photo": decode * 1e3, "resize+crop+normalise, ms/photo": preprocess * 1e3,
            "first view, 1 photo per run, ms/photo": one_at_a_time * 1e3,
            "first view, 64 photos per run, ms/photo": batch_of_64 * 1e3,
            "share given the mirror view (these 64)": float((confidence < (mirror_below or np.inf)).mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="", help="a default run to use; empty: train one (cached features)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every contender")
    parser.add_argument("--tutorial-limit", type=int, default=500, help="photos the (slow) tutorial loop gets")
    parser.add_argument("--skip-accuracy", action="store_true")
    arguments = parser.parse_args()
    data = require_shared_data()
    with tempfile.TemporaryDirectory(prefix="catdog-predict-bench-") as scratch:
        scratch = Path(scratch)
        run = Path(arguments.run) if arguments.run else train_default_run(data, scratch / "run")
        folder = make_resized_photos(data / "test1", scratch / "original", 500, (500, 375))
        catdog_predict(run, folder, scratch / "warmup.csv")  # first use: exports the run's ONNX file
        contenders = {
            "catdog predict --run RUN FOLDER": lambda out: catdog_predict(run, folder, out),
            "  same, --tta (mirror for every photo)": lambda out: catdog_predict(run, folder, out, "--tta"),
            "tutorial loop, ResNet-18 (reference)": lambda out: tutorial_predict_image_loop(folder, out, arguments.tutorial_limit),
        }
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        cpu_per_photo: dict[str, list[float]] = {name: [] for name in contenders}
        for round_index in range(arguments.rounds):
            for position, (name, measure) in enumerate(contenders.items()):
                cpu_before = cpu_seconds()
                seconds, count = measure(scratch / f"contender-{position}.csv")
                rates[name].append(count / seconds)
                cpu_per_photo[name].append((cpu_seconds() - cpu_before) / count)
                print(f"round {round_index + 1}: {name.strip():42s} {count} photos in {seconds:6.1f} s = {count / seconds:5.1f}/s, "
                      f"{1e3 * cpu_per_photo[name][-1]:.0f} ms CPU per photo", flush=True)
        scheme = read_probabilities(scratch / "contender-0.csv")
        every = read_probabilities(scratch / "contender-1.csv")
        agreement = np.mean([scheme[p].argmax() == every[p].argmax() for p in every])
        largest_difference = max(float(np.abs(scheme[p] - every[p]).max()) for p in every)
        profiled = profile(run, folder, scratch)
        accuracy = None if arguments.skip_accuracy else accuracy_check(run)

    print(f"\nmachine: {machine_description()}")
    print("input: the 500 test1 photos at 500x375 (Kaggle's typical original size); images/s end to end, median of "
          f"{arguments.rounds} interleaved rounds; catdog in a fresh process each time (start-up included)")
    reference = statistics.median(rates["tutorial loop, ResNet-18 (reference)"])
    reference_cpu = statistics.median(cpu_per_photo["tutorial loop, ResNet-18 (reference)"])
    print(f"{'contender':44s} {'images/s':>9s} {'vs tutorial':>12s} {'CPU ms/photo':>13s} {'vs tutorial':>12s}   rounds (images/s)")
    for name, values in rates.items():
        rate, cpu = statistics.median(values), statistics.median(cpu_per_photo[name])
        print(f"{name:44s} {rate:9.1f} {rate / reference:11.2f}x {1e3 * cpu:13.0f} {reference_cpu / cpu:11.2f}x   "
              f"{', '.join(f'{v:.1f}' for v in values)}")
    print("\nprofile (this process; the machine's load shifts these):")
    for key, value in profiled.items():
        print(f"  {key:44s} {value:8.3f}")
    print(f"\nunseen photos (test1 at 500x375): the scheme agrees with the mirror view for every photo on {agreement:.1%} "
          f"of {len(every)} labels; largest probability difference {largest_difference:.4f}")
    if accuracy:
        (every_accuracy, every_loss), (scheme_accuracy, scheme_loss) = accuracy["every_photo"], accuracy["scheme"]
        print(f"validation split ({accuracy['photos']} photos), mirror_below {accuracy['mirror_below']}, "
              f"{accuracy['mirrored_share']:.1%} given the mirror view:")
        print(f"  mirror view for every photo: accuracy {every_accuracy:.4%}, log loss {every_loss:.5f}")
        print(f"  predict's scheme:            accuracy {scheme_accuracy:.4%}, log loss {scheme_loss:.5f} "
              f"(differences {100 * (scheme_accuracy - every_accuracy):+.3f} points, {scheme_loss - every_loss:+.5f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
