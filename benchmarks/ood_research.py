"""Out-of-distribution ("neither a cat nor a dog") research: which score, which bank, which threshold.

Compares, for the default preset (EfficientNet-Lite2 frozen features at 300 px) and the fast preset (Lite0 at
224 px), on catdog's split of the 6,000 shared photos (80/20, seed 42):
- kNN distance on L2-normalised penultimate features (Sun et al., ICML 2022), k in {1, 5, 10, 50}, banks of the
  training photos' original views, original + mirror views, and seeded subsamples of 1,000 / 2,000 vectors;
- class-conditional Mahalanobis distance with a shared (shrunk) covariance (Lee et al., 2018) on raw and
  normalised features, and a PCA (low-rank) version;
- energy (Liu et al., 2020) and maximum softmax probability of the trained linear head;
- averaging the scores of the original and mirror views.
Then the built-in zero-training model (ImageNet EfficientNet-Lite0, cat and dog classes summed): decision rules
and "not a pet" scores.

Not-pets (../shared/data/not-pets/{people,animals,objects,scenes}) and leopards (../shared/data/not-pets-near/
wild-felids) are only scored, never fitted on. Thresholds are set on the validation photos (keep 99%).

Intermediate arrays are cached under --scratch (features, the heads' runs, ImageNet logits); catdog's feature
cache (~/.cache/catdog or $CATDOG_CACHE) is filled on the way, so later `catdog train` runs reuse it.

    python benchmarks/ood_research.py [--scratch /tmp/ood] [--presets fast default] [--skip-builtin]
        [--builtin-sizes 224 320] [--timings-only]

Cold on a shared 2-core CPU: features ~15 min (Lite0 3 min, Lite2 12 min for 7,205 photos x 2 views), the
built-in model at 320 px ~10 min; from the scratch caches the whole report takes a few minutes.

Findings (2026-12-03, 2-core CPU; numbers in the printed tables):
- Trained runs: kNN on L2-normalised features, k = 5, bank = the training photos' original views (4,800 here,
  12.3 MB as float16), first view only: AUROC 0.9993 / 0.9992 (fast / default), 0.09% / 0.28% of not-pets and
  0.3% / 0.8% of people accepted at the 99% threshold, leopards 8.3% / 5.0%. k = 1 is unstable (fast: 4% of
  people), k = 50 too smooth; mirror views in the bank or averaged scores change little. Subsampled banks of 2,000
  work with k = 5 (default: 0.28-0.92% accepted over five seeds) but k = 10 with 2,000 lets in up to 3.7% of
  people (default). Max softmax and energy of the two-class head are useless here (AUROC ~0.97, 60-90% of
  not-pets accepted). Mahalanobis on normalised features is as good on the default preset but 0.9989 on the fast;
  on raw features it fails on animals and leopards.
- Built-in model: at 224 px the best fixed prior reaches 97.4%; at 320 px (FixRes, as the default preset's
  features) comparing the mean cat-class with the mean dog-class probability (sum + log(118/5)) gives 98.42%
  with balanced errors, and "neither" when P(cat or dog classes) < 0.14 refuses 1.3% of the 6,000 photos and
  accepts 1.1% of not-pets, no leopard.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CATDOG, ROOT, machine_description, require_shared_data  # noqa: E402

NOT_PETS = ROOT.parent / "shared" / "data" / "not-pets"
NEAR = ROOT.parent / "shared" / "data" / "not-pets-near" / "wild-felids"
FOLDERS = ("people", "animals", "objects", "scenes")
PRESETS = {  # preset: (model, feature input size)
    "fast": ("efficientnet_lite0", 224),
    "default": ("efficientnet_lite2", 300),
}
KEEP = 0.99  # the threshold keeps this share of validation photos
SUBSAMPLE_SEED = 0


# ---------------------------------------------------------------- data and features


@dataclasses.dataclass
class Photos:
    train_paths: list[Path]
    paths: list[Path]  # all 6,000 shared photos, in discover's order
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    ood_paths: list[Path]
    ood_folder: np.ndarray  # index into FOLDERS
    near_paths: list[Path]


def load_photos() -> Photos:
    from catdog.runtime.data import discover, stratified_split

    images = discover(require_shared_data() / "train")
    train_idx, val_idx = stratified_split(images.labels, 0.2, 42)
    ood_paths, ood_folder = [], []
    for index, folder in enumerate(FOLDERS):
        files = sorted((NOT_PETS / folder).iterdir())
        ood_paths += files
        ood_folder += [index] * len(files)
    return Photos(list(images.paths), list(images.paths), np.array(images.labels), np.array(train_idx),
                  np.array(val_idx), ood_paths, np.array(ood_folder), sorted(NEAR.iterdir()))


def preset_features(preset: str, photos: Photos, scratch: Path) -> dict[str, np.ndarray]:
    """{"pets", "ood", "near"}: [files, 2 views, dim] float32, through catdog's feature cache (same keys as
    `catdog train` with this preset), saved to scratch as .npy."""
    from catdog.training.features import extract_features
    from catdog.training.models import create_model, get_model_spec

    model, size = PRESETS[preset]
    out = {}
    for name, paths in (("pets", photos.paths), ("ood", photos.ood_paths), ("near", photos.near_paths)):
        file = scratch / f"features-{preset}-{name}.npy"
        if not file.is_file():
            preprocess = dataclasses.replace(get_model_spec(model).preprocess, input_size=size)
            started = time.perf_counter()
            fs = extract_features(paths, lambda: create_model(model, 2, pretrained=True, freeze_backbone=True).backbone,
                                  model, preprocess, ("original", "flipped"), num_workers=1)
            print(f"  {preset} {name}: {len(paths)} photos, {fs.computed} computed, {time.perf_counter() - started:.0f} s,"
                  f" {len(fs.errors)} unreadable", flush=True)
            np.save(file, fs.features)
        out[name] = np.load(file)
    return out


def trained_head(preset: str, scratch: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(weight [2, D], bias [2], temperature) of `catdog train --preset <preset>` on the shared photos (features from
    the cache: seconds). Trained by this checkout's catdog; if that fails (a tree being edited), by a snapshot of
    the last commit (`git archive HEAD src`) under the scratch folder."""
    import os

    run = scratch / f"run-{preset}"
    if not (run / "model.safetensors").is_file():
        command = [*CATDOG, "train", "--data", str(require_shared_data() / "train"), "--preset", preset, "--out", str(run)]
        if subprocess.run(command).returncode != 0:
            snapshot = scratch / "catdog-head"
            if not (snapshot / "src" / "catdog").is_dir():
                snapshot.mkdir(parents=True, exist_ok=True)
                archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "src"], check=True, capture_output=True)
                subprocess.run(["tar", "-x", "-C", str(snapshot)], input=archive.stdout, check=True)
            print(f"  training again with the last commit's catdog ({snapshot / 'src'})", flush=True)
            subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(snapshot / "src")})
    from catdog.runtime.runs import read_meta
    from safetensors.numpy import load_file

    tensors = load_file(str(run / "model.safetensors"))
    meta = read_meta(run)
    return (tensors["head.weight"].astype(np.float64), tensors["head.bias"].astype(np.float64), float(meta.temperature))


# ---------------------------------------------------------------- scores and metrics


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """P(outlier score > inlier score), ties counting half (higher score = more unusual)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([inliers, outliers]))
    n_in, n_out = len(inliers), len(outliers)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def threshold_keeping(scores: np.ndarray, keep: float = KEEP) -> float:
    return float(np.quantile(scores, keep, method="higher"))  # as catdog.runtime.probabilities.threshold_keeping


def knn_scores(bank: np.ndarray, queries: np.ndarray, ks: tuple[int, ...], batch: int = 1024) -> dict[int, np.ndarray]:
    """{k: 1 - cosine similarity to the k-th nearest bank vector} (bank and queries L2-normalised, float32);
    monotone in the Euclidean distance between unit vectors (d^2 = 2 (1 - cos)), so AUROC is the same."""
    out = {k: [] for k in ks}
    for start in range(0, len(queries), batch):
        similarity = queries[start:start + batch] @ bank.T
        top = -np.sort(-np.partition(similarity, -max(ks), axis=1)[:, -max(ks):], axis=1)  # descending
        for k in ks:
            out[k].append(1.0 - top[:, k - 1])
    return {k: np.concatenate(v) for k, v in out.items()}


class Evaluation:
    """One score per photo for val / not-pets / leopards -> the table's row."""

    header = (f"{'method':<44} {'AUROC':>7} {'people':>7} {'animal':>7} {'object':>7} {'scenes':>7} {'leopard':>7} | "
              f"{'thr':>8} {'acc%':>5} {'ppl%':>5} {'ani%':>5} {'obj%':>5} {'scn%':>5} {'leo%':>5} {'refV%':>5} {'refH%':>5}")

    def __init__(self, ood_folder: np.ndarray):
        self.ood_folder = ood_folder
        self.rows: list[dict] = []

    def add(self, name: str, val: np.ndarray, ood: np.ndarray, near: np.ndarray, keep: float = KEEP,
            show: bool = True) -> dict:
        threshold = threshold_keeping(val, keep)
        # held-out check of the threshold: chosen on one half of the validation photos, refused share of the other
        rng = np.random.default_rng(1)
        halves = np.array_split(rng.permutation(len(val)), 2)
        held_out = np.mean([(val[b] > threshold_keeping(val[a], keep)).mean() for a, b in (halves, halves[::-1])])
        row = {
            "name": name, "auroc": auroc(val, ood),
            "folder_auroc": [auroc(val, ood[self.ood_folder == i]) for i in range(len(FOLDERS))],
            "near_auroc": auroc(val, near), "threshold": threshold,
            "accepted": float((ood <= threshold).mean()),
            "folder_accepted": [float((ood[self.ood_folder == i] <= threshold).mean()) for i in range(len(FOLDERS))],
            "near_accepted": float((near <= threshold).mean()), "val_refused": float((val > threshold).mean()),
            "held_out_refused": float(held_out),
        }
        self.rows.append(row)
        if show:
            print(self.format(row), flush=True)
        return row

    @staticmethod
    def format(row: dict) -> str:
        f = row["folder_auroc"]
        a = row["folder_accepted"]
        return (f"{row['name']:<44} {row['auroc']:7.4f} {f[0]:7.4f} {f[1]:7.4f} {f[2]:7.4f} {f[3]:7.4f} "
                f"{row['near_auroc']:7.4f} | {row['threshold']:8.4f} {100 * row['accepted']:5.2f} {100 * a[0]:5.1f} "
                f"{100 * a[1]:5.1f} {100 * a[2]:5.1f} {100 * a[3]:5.1f} {100 * row['near_accepted']:5.1f} "
                f"{100 * row['val_refused']:5.2f} {100 * row['held_out_refused']:5.2f}")


def mahalanobis_fit(train: np.ndarray, labels: np.ndarray, shrinkage: float | str, rank: int = 0):
    """Class means and the shared within-class precision matrix (optionally in the top `rank` principal axes of
    the centred training features). shrinkage: a fixed alpha (Sigma = (1-a) S + a tr(S)/D I) or "lw" (Ledoit-Wolf)."""
    from sklearn.covariance import ledoit_wolf

    means = np.stack([train[labels == c].mean(0) for c in np.unique(labels)])
    centred = train - means[labels]
    projection = None
    if rank:
        _, _, vt = np.linalg.svd(centred - centred.mean(0), full_matrices=False)
        projection = vt[:rank].T  # [D, r]
        centred = centred @ projection
        means = means @ projection
    if shrinkage == "lw":
        covariance, _ = ledoit_wolf(centred, assume_centered=True)
    else:
        sample = centred.T @ centred / len(centred)
        covariance = (1 - shrinkage) * sample + shrinkage * np.trace(sample) / len(sample) * np.eye(len(sample))
    return means, np.linalg.inv(covariance), projection


def mahalanobis_scores(fit, x: np.ndarray) -> np.ndarray:
    means, precision, projection = fit
    if projection is not None:
        x = x @ projection
    distances = []
    for mean in means:
        d = x - mean
        distances.append(((d @ precision) * d).sum(1))
    return np.min(distances, axis=0)


def pca_residual_fit(train: np.ndarray, rank: int):
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    return mean, vt[:rank].T


def pca_residual_scores(fit, x: np.ndarray) -> np.ndarray:
    mean, basis = fit
    d = x - mean
    return np.linalg.norm(d - (d @ basis) @ basis.T, axis=1)


def head_scores(weight: np.ndarray, bias: np.ndarray, temperature: float, x: np.ndarray) -> dict[str, np.ndarray]:
    logits = x.astype(np.float64) @ weight.T + bias
    scaled = logits / temperature
    lse = np.logaddexp.reduce(scaled, axis=1)
    return {"energy": -temperature * lse, "msp": -np.exp(scaled.max(1) - lse)}


def evaluate_preset(preset: str, photos: Photos, scratch: Path, keep: float) -> tuple[Evaluation, dict]:
    features = preset_features(preset, photos, scratch)
    pets, ood, near = features["pets"], features["ood"], features["near"]
    for name, array in features.items():
        bad = np.isnan(array).any(axis=(1, 2))
        if bad.any():
            print(f"  {name}: {bad.sum()} unreadable photos left out")
    assert not np.isnan(pets).any() and not np.isnan(ood).any() and not np.isnan(near).any()
    train, val = pets[photos.train_idx], pets[photos.val_idx]
    train_labels = photos.labels[photos.train_idx]
    dim = train.shape[-1]
    evaluation = Evaluation(photos.ood_folder)
    print(f"\n## {preset} preset: {PRESETS[preset][0]} at {PRESETS[preset][1]} px, D = {dim}; "
          f"{len(train)} training, {len(val)} validation, {len(ood)} not-pets, {len(near)} leopards; threshold keeps "
          f"{keep:.0%} of validation\n")
    print("AUROC: not-pets (overall, per folder) and leopards against validation; at the threshold: accepted shares "
          "(acc = all not-pets), refV = validation refused, refH = refused on a held-out half (threshold from the other half)")
    print(Evaluation.header)
    unit = {name: normalised(array.astype(np.float32)) for name, array in (("train", train), ("val", val), ("ood", ood), ("near", near))}
    ks = (1, 5, 10, 50)
    rng = np.random.default_rng(SUBSAMPLE_SEED)
    n_train = len(train)
    banks = {
        "orig": unit["train"][:, 0],
        "orig+mirror": unit["train"].reshape(-1, dim),
        "orig, 2000": unit["train"][np.sort(rng.choice(n_train, 2000, replace=False)), 0],
        "orig, 1000": unit["train"][np.sort(np.random.default_rng(SUBSAMPLE_SEED).choice(n_train, 1000, replace=False)), 0],
        "orig+mirror, 2000": unit["train"].reshape(-1, dim)[np.sort(np.random.default_rng(SUBSAMPLE_SEED).choice(2 * n_train, 2000, replace=False))],
        "orig, 500": unit["train"][np.sort(np.random.default_rng(SUBSAMPLE_SEED).choice(n_train, 500, replace=False)), 0],
    }
    stored = {}  # scores kept for the combinations and the refused-photo listing
    for bank_name, bank in banks.items():
        megabytes = bank.size * 2 / 1e6
        per_view = {}
        for view in (0, 1):
            per_view[view] = {name: knn_scores(bank, unit[name][:, view], ks) for name in ("val", "ood", "near")}
        for k in ks:
            if k >= len(bank):
                continue
            label = f"kNN k={k:<2} {bank_name} ({len(bank)}, {megabytes:.1f} MB)"
            evaluation.add(label, *(per_view[0][n][k] for n in ("val", "ood", "near")))
            stored[("knn", bank_name, k, "first")] = tuple(per_view[0][n][k] for n in ("val", "ood", "near"))
            if bank_name in ("orig", "orig, 2000", "orig+mirror") and k in (5, 10):
                mean_views = tuple((per_view[0][n][k] + per_view[1][n][k]) / 2 for n in ("val", "ood", "near"))
                stored[("knn", bank_name, k, "mean")] = mean_views
                evaluation.add("  + mean of both views' scores", *mean_views)
    # the mean feature of both views, normalised, against the original-view bank
    for k in (5, 10):
        mean_unit = {n: normalised(unit[n].mean(1)) for n in ("val", "ood", "near")}
        s = {n: knn_scores(banks["orig, 2000"], mean_unit[n], (k,))[k] for n in mean_unit}
        evaluation.add(f"kNN k={k} orig, 2000; query = mean of views' vectors", s["val"], s["ood"], s["near"])
    # how much a seeded subsample matters: five seeds per bank size (first view, original-view bank)
    print("\nsubsampled banks, five seeds each: mean [min, max] over the seeds")
    print(f"{'bank':<22} {'k':>3} {'AUROC':>22} {'not-pets acc %':>20} {'people acc %':>20} {'leopards acc %':>20}")
    for size in (1000, 2000, 3000):
        for k in (1, 5, 10):
            rows = []
            for seed in range(5):
                bank = unit["train"][np.sort(np.random.default_rng(seed).choice(n_train, size, replace=False)), 0]
                sc = {n: knn_scores(bank, unit[n][:, 0], (k,))[k] for n in ("val", "ood", "near")}
                rows.append(evaluation.add(f"kNN k={k} orig, {size}, seed {seed}", sc["val"], sc["ood"], sc["near"], keep, show=False))
            spread = lambda key, scale=100.0, fmt=".2f": (
                f"{scale * np.mean(key):{fmt}} [{scale * np.min(key):{fmt}}, {scale * np.max(key):{fmt}}]")
            print(f"{'orig, ' + str(size) + f' ({size * dim * 2 / 1e6:.1f} MB)':<22} {k:>3} "
                  f"{spread([r['auroc'] for r in rows], 1.0, '.4f'):>22} {spread([r['accepted'] for r in rows]):>20} "
                  f"{spread([r['folder_accepted'][0] for r in rows], fmt='.1f'):>20} {spread([r['near_accepted'] for r in rows], fmt='.1f'):>20}")

    print()
    for space in ("raw", "unit"):
        base = {"train": train[:, 0].astype(np.float64), "val": val[:, 0].astype(np.float64),
                "ood": ood[:, 0].astype(np.float64), "near": near[:, 0].astype(np.float64)}
        if space == "unit":
            base = {n: normalised(v) for n, v in base.items()}
        for shrinkage, rank in (("lw", 0), (0.1, 0), (0.5, 0), ("lw", 256), ("lw", 64)):
            fit = mahalanobis_fit(base["train"], train_labels, shrinkage, rank)
            s = {n: mahalanobis_scores(fit, base[n]) for n in ("val", "ood", "near")}
            matrix = (rank or dim) ** 2 * 2 / 1e6 + (rank * dim * 2 / 1e6 if rank else 0)
            label = f"Mahalanobis {space}, shrink={shrinkage}" + (f", PCA {rank}" if rank else "") + f" ({matrix:.1f} MB)"
            evaluation.add(label, s["val"], s["ood"], s["near"])
            stored[("maha", space, shrinkage, rank)] = (s["val"], s["ood"], s["near"])
        for rank in (64, 256):
            fit = pca_residual_fit(base["train"], rank)
            s = {n: pca_residual_scores(fit, base[n]) for n in ("val", "ood", "near")}
            evaluation.add(f"PCA residual norm {space}, rank {rank}", s["val"], s["ood"], s["near"])

    print()
    weight, bias, temperature = trained_head(preset, scratch)
    for view_rule in ("first", "mean"):
        scores = {}
        for n, x in (("val", val), ("ood", ood), ("near", near)):
            if view_rule == "first":
                scores[n] = head_scores(weight, bias, temperature, x[:, 0])
            else:
                a, b = head_scores(weight, bias, temperature, x[:, 0]), head_scores(weight, bias, temperature, x[:, 1])
                scores[n] = {key: (a[key] + b[key]) / 2 for key in a}
        for key in ("energy", "msp"):
            evaluation.add(f"head {key} (T={temperature:.2f}), {view_rule} view{'s' if view_rule == 'mean' else ''}",
                           *(scores[n][key] for n in ("val", "ood", "near")))
            stored[("head", key, view_rule)] = tuple(scores[n][key] for n in ("val", "ood", "near"))
    # a combination: kNN rank-normalised + energy (z-scores on the validation photos)
    knn = stored[("knn", "orig, 2000", 10, "first")]
    energy = stored[("head", "energy", "first")]
    z = lambda s, ref: (s - ref.mean()) / ref.std()
    evaluation.add("z(kNN k=10 orig 2000) + z(energy)", *(z(a, knn[0]) + z(b, energy[0]) for a, b in zip(knn, energy)))
    return evaluation, stored


# ---------------------------------------------------------------- the built-in zero-training model


CAT_CLASSES = tuple(range(281, 286))  # catdog.training.models.IMAGENET_CAT_CLASSES
DOG_CLASSES = tuple(range(151, 269))


def imagenet_logits(photos: Photos, scratch: Path) -> dict[str, np.ndarray]:
    """1000-class logits of ImageNet EfficientNet-Lite0 at its own 224 px: the classifier layer applied to the
    fast preset's cached pooled features of the original view (the very features `ImageNetCatDogClassifier` computes;
    the cache rounds them to float16, checked against the full network on a few photos below)."""
    import torch

    from catdog.runtime.images import load_image
    from catdog.training.models import get_model_spec, load_efficientnet_lite_imagenet
    from catdog.runtime.transforms import eval_transform

    files = {name: scratch / f"imagenet-logits-{name}.npy" for name in ("pets", "ood", "near")}
    if all(f.is_file() for f in files.values()):
        return {name: np.load(f) for name, f in files.items()}
    features = preset_features("fast", photos, scratch)
    net = load_efficientnet_lite_imagenet("efficientnet_lite0").eval()
    weight, bias = net.classifier.weight.detach().numpy(), net.classifier.bias.detach().numpy()
    out = {name: features[name][:, 0].astype(np.float32) @ weight.T + bias for name in files}
    preprocess = get_model_spec("efficientnet_lite0").preprocess
    transform = eval_transform(preprocess)
    check = [photos.paths[i] for i in range(0, 6000, 600)] + photos.ood_paths[::200] + photos.near_paths[::60]
    expected = np.concatenate([out["pets"][0:6000:600], out["ood"][::200], out["near"][::60]])
    images = torch.from_numpy(np.stack([transform(load_image(p, draft_size=preprocess.resize_size)) for p in check]))
    with torch.inference_mode():
        direct = net(images).numpy()
    print(f"ImageNet logits from cached features vs the network on {len(check)} photos: max |difference| "
          f"{np.abs(direct - expected).max():.4f}, same top-1 {np.mean(direct.argmax(1) == expected.argmax(1)):.0%}")
    for name, f in files.items():
        np.save(f, out[name])
    return out


def imagenet_logits_at(photos: Photos, scratch: Path, size: int) -> dict[str, np.ndarray]:
    """The same 1000-class logits with the network run on the photos at another input size (crop share kept: the
    photo is resized to size / 0.875 and centre-cropped), original view only."""
    import torch

    from catdog.runtime.images import load_image
    from catdog.training.models import get_model_spec, load_efficientnet_lite_imagenet
    from catdog.runtime.transforms import eval_transform

    files = {name: scratch / f"imagenet-logits-{size}px-{name}.npy" for name in ("pets", "ood", "near")}
    if all(f.is_file() for f in files.values()):
        return {name: np.load(f) for name, f in files.items()}
    net = load_efficientnet_lite_imagenet("efficientnet_lite0").eval()
    preprocess = dataclasses.replace(get_model_spec("efficientnet_lite0").preprocess, input_size=size)
    transform = eval_transform(preprocess)
    out = {}
    for name, paths in (("pets", photos.paths), ("ood", photos.ood_paths), ("near", photos.near_paths)):
        if files[name].is_file():
            out[name] = np.load(files[name])
            continue
        started, chunks = time.perf_counter(), []
        for start in range(0, len(paths), 50):
            batch = np.stack([transform(load_image(p, draft_size=preprocess.resize_size)) for p in paths[start:start + 50]])
            with torch.inference_mode():
                chunks.append(net(torch.from_numpy(batch)).numpy())
        out[name] = np.concatenate(chunks)
        np.save(files[name], out[name])
        print(f"  ImageNet logits at {size} px, {name}: {len(paths)} photos, {time.perf_counter() - started:.0f} s", flush=True)
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def group_log_mass(log_p: np.ndarray, classes) -> np.ndarray:
    return np.logaddexp.reduce(log_p[:, list(classes)], axis=1)


def evaluate_builtin(photos: Photos, scratch: Path, size: int = 224) -> None:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    describe = lambda c: f"{c} {info.index_to_description(c).split(',')[0]}"
    logits = imagenet_logits(photos, scratch) if size == 224 else imagenet_logits_at(photos, scratch, size)
    log_p = {n: log_softmax(v) for n, v in logits.items()}
    labels = photos.labels  # 0 cat, 1 dog
    print(f"\n## built-in model: ImageNet EfficientNet-Lite0 at {size} px, all {len(labels)} shared photos\n")
    top1 = log_p["pets"].argmax(1)
    for c, name in ((0, "cats"), (1, "dogs")):
        others = top1[(labels == c)]
        groups = {"cat classes": np.isin(others, CAT_CLASSES).mean(), "dog classes": np.isin(others, DOG_CLASSES).mean()}
        print(f"{name}: ImageNet top-1 in cat classes {groups['cat classes']:.1%}, in dog classes {groups['dog classes']:.1%}, "
              f"elsewhere {1 - sum(groups.values()):.1%}")

    def rule_report(name: str, cat_score: np.ndarray) -> np.ndarray:
        """cat_score > 0 -> cat."""
        predicted = (cat_score <= 0).astype(int)
        wrong = predicted != labels
        cats_as_dogs = int((wrong & (labels == 0)).sum())
        dogs_as_cats = int((wrong & (labels == 1)).sum())
        share = max(cats_as_dogs, dogs_as_cats) / max(1, wrong.sum())
        print(f"{name:<58} accuracy {1 - wrong.mean():7.2%}  errors {wrong.sum():4d}: cats->dog {cats_as_dogs:4d}, "
              f"dogs->cat {dogs_as_cats:4d} (largest class {share:.0%} of errors)")
        return wrong

    print("\n### cat/dog decision rules\n")
    lp = log_p["pets"]
    cat_sum, dog_sum = group_log_mass(lp, CAT_CLASSES), group_log_mass(lp, DOG_CLASSES)
    wrong = rule_report("sum of class probabilities (today)", cat_sum - dog_sum)
    print("  top-1 ImageNet classes of the cats called dogs:",
          ", ".join(f"{describe(c)} x{n}" for c, n in _most_common(top1[wrong & (labels == 0)], 12)))
    print("  top-1 ImageNet classes of the dogs called cats:",
          ", ".join(f"{describe(c)} x{n}" for c, n in _most_common(top1[wrong & (labels == 1)], 12)))
    print("  the cats' top-1 outside the cat classes (all cats):",
          ", ".join(f"{describe(c)} x{n}" for c, n in _most_common(top1[(labels == 0) & ~np.isin(top1, CAT_CLASSES)], 12)))
    print("  the dogs' top-1 outside the dog classes (all dogs):",
          ", ".join(f"{describe(c)} x{n}" for c, n in _most_common(top1[(labels == 1) & ~np.isin(top1, DOG_CLASSES)], 12)))
    margin = cat_sum - dog_sum
    for bias in (1.0, 2.0, 2.5, 3.0, np.log(len(DOG_CLASSES) / len(CAT_CLASSES)), 3.5, 4.0, 4.5, 5.0):
        rule_report(f"sum + log prior correction b={bias:.2f} (cat if log Pc - log Pd + b > 0)", margin + bias)
    # the prior correction chosen on one half, checked on the other
    rng = np.random.default_rng(0)
    halves = np.array_split(rng.permutation(len(labels)), 2)
    grid = np.arange(0, 5.01, 0.1)
    for a, b in (halves, halves[::-1]):
        errors = [((margin[a] + g <= 0).astype(int) != labels[a]).sum() for g in grid]
        best = grid[int(np.argmin(errors))]
        held = ((margin[b] + best <= 0).astype(int) != labels[b]).mean()
        print(f"  b chosen on one half: {best:.1f} ({min(errors)} errors of {len(a)}), other half accuracy {1 - held:.2%}")
    rule_report("max class per group", lp[:, list(CAT_CLASSES)].max(1) - lp[:, list(DOG_CLASSES)].max(1))
    rule_report("mean class per group (= sum + log(118/5))", margin + np.log(len(DOG_CLASSES) / len(CAT_CLASSES)))
    wild = (286, 287)  # cougar, lynx: the classes tabbies are most often mistaken for, after the cat classes
    for extra in ((287,), (286, 287), (286, 287, 288, 289, 290, 291, 292, 293)):
        cats = CAT_CLASSES + extra
        rule_report(f"sum, cat classes + {','.join(map(str, extra))}", group_log_mass(lp, cats) - dog_sum)
        rule_report(f"sum, cat classes + {','.join(map(str, extra))}, b=1.0", group_log_mass(lp, cats) - dog_sum + 1.0)

    print("\n### not-a-pet scores of the built-in model (higher = less like a pet), against all 6,000 photos\n")
    evaluation = Evaluation(photos.ood_folder)
    print(Evaluation.header.replace("refV%", "ref6k").replace("refH%", "refHf"))
    candidates = {
        "-log P(cat or dog classes)": lambda l: -np.logaddexp(group_log_mass(l, CAT_CLASSES), group_log_mass(l, DOG_CLASSES)),
        "-log max P(one pet class)": lambda l: -l[:, list(CAT_CLASSES + DOG_CLASSES)].max(1),
        "-log P(pet classes + cougar, lynx)": lambda l: -group_log_mass(l, CAT_CLASSES + DOG_CLASSES + wild),
    }
    raw = {"-logsumexp(pet logits) (unnormalised)": lambda z: -np.logaddexp.reduce(z[:, list(CAT_CLASSES + DOG_CLASSES)], axis=1),
           "energy of all 1000 logits": lambda z: -np.logaddexp.reduce(z, axis=1)}
    scored = {}
    for name, f in candidates.items():
        scored[name] = {n: f(log_p[n]) for n in log_p}
    for name, f in raw.items():
        scored[name] = {n: f(logits[n].astype(np.float64)) for n in logits}
    for name, s in scored.items():
        evaluation.add(f"{name}, keep 99%", s["pets"], s["ood"], s["near"])
    mass = scored["-log P(cat or dog classes)"]
    print("\nfixed thresholds on the pet mass P = P(cat classes) + P(dog classes): 'neither' when P < t")
    print(f"{'t':>6} {'6k refused':>10} {'cats ref':>8} {'dogs ref':>8} {'not-pets acc':>12} {'people':>7} {'animals':>7} "
          f"{'objects':>7} {'scenes':>7} {'leopards':>8}")
    for t in (0.9, 0.7, 0.5, 0.4, 0.3, 0.25, 0.2, 0.175, 0.15, 0.145, 0.14, 0.135, 0.13, 0.12, 0.1, 0.05, 0.02):
        threshold = -np.log(t)
        pets_refused = mass["pets"] > threshold
        accepted = mass["ood"] <= threshold
        folders = [accepted[photos.ood_folder == i].mean() for i in range(len(FOLDERS))]
        print(f"{t:6.3f} {pets_refused.mean():10.2%} {pets_refused[labels == 0].mean():8.2%} {pets_refused[labels == 1].mean():8.2%} "
              f"{accepted.mean():12.2%} {folders[0]:7.1%} {folders[1]:7.1%} {folders[2]:7.1%} {folders[3]:7.1%} "
              f"{(mass['near'] <= threshold).mean():8.1%}")
    for q in (0.99, 0.985, 0.98):
        print(f"  P threshold keeping {q:.1%} of the 6,000: t = {np.exp(-np.quantile(mass['pets'], q, method='higher')):.4f}")
    print("\nthe not-pets most like pets (highest pet mass):")
    order = np.argsort(mass["ood"])[:12]
    for i in order:
        print(f"  {photos.ood_paths[i].parent.name}/{photos.ood_paths[i].name}: P = {np.exp(-mass['ood'][i]):.3f}, "
              f"top-1 {describe(int(log_p['ood'][i].argmax()))}")
    print("the pet photos least like pets (lowest pet mass):")
    for i in np.argsort(-mass["pets"])[:15]:
        print(f"  {photos.paths[i].name}: P = {np.exp(-mass['pets'][i]):.3f}, top-1 {describe(int(log_p['pets'][i].argmax()))}")


def _most_common(values: np.ndarray, n: int) -> list[tuple[int, int]]:
    unique, counts = np.unique(values, return_counts=True)
    order = np.argsort(-counts)[:n]
    return [(int(unique[i]), int(counts[i])) for i in order]


# ---------------------------------------------------------------- refused validation photos and timings


def list_refused(preset: str, photos: Photos, stored: dict, key: tuple, keep: float) -> None:
    val_scores = stored[key][0]
    threshold = threshold_keeping(val_scores, keep)
    refused = np.flatnonzero(val_scores > threshold)
    refused = refused[np.argsort(-val_scores[refused])]
    print(f"\nrefused validation photos, {preset}, {key}: {len(refused)} (threshold {threshold:.4f})")
    print("  " + ", ".join(f"{photos.paths[photos.val_idx[i]].name} ({val_scores[i]:.3f})" for i in refused))


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def timings(presets: list[str]) -> None:
    import onnxruntime
    import torch

    from catdog.training.features import default_cache_dir
    from catdog.runtime.inference import session_options

    from threadpoolctl import threadpool_limits

    # one BLAS thread for the one-photo NumPy timings: on a shared 2-core machine a second BLAS thread waiting for a
    # core makes every call cost a scheduler tick (8 ms measured) whatever the work
    threadpool_limits(1)
    print("\n## cost per photo (median, one photo at a time, NumPy on one BLAS thread, this machine while shared)\n")
    rng = np.random.default_rng(0)
    for preset in presets:
        model, size = PRESETS[preset]
        dim = 1280  # EfficientNet-Lite keeps Lite0's 1280-channel head at every size (Lite2 too)
        candidates = sorted((default_cache_dir() / "onnx").glob(f"{model}-backbone-{size}-*.onnx"))
        if candidates:
            session = onnxruntime.InferenceSession(str(candidates[-1]), session_options(max(1, torch.get_num_threads())),
                                                   providers=["CPUExecutionProvider"])
            image = rng.standard_normal((1, 3, size, size)).astype(np.float32)
            session.run(None, {"images": image})
            forward = median_seconds(lambda: session.run(None, {"images": image}), 20)
            print(f"{preset}: backbone forward (ONNX Runtime, batch 1, {size} px): {1000 * forward:.1f} ms")
        query = rng.standard_normal((1, dim)).astype(np.float32)
        for bank_size in (1000, 2000, 4800, 9600):
            bank = normalised(rng.standard_normal((bank_size, dim)).astype(np.float32))
            k = 10

            def knn():
                similarity = normalised(query) @ bank.T
                return 1.0 - np.partition(similarity, -k, axis=1)[:, -k]

            knn()
            print(f"{preset}: kNN score, bank {bank_size} x {dim} (float32 in memory, {bank_size * dim * 2 / 1e6:.1f} MB "
                  f"as float16): {1000 * median_seconds(knn, 200):.3f} ms")
        precision = np.eye(dim, dtype=np.float32)
        means = rng.standard_normal((2, dim)).astype(np.float32)

        def mahalanobis():
            d = normalised(query) - means
            return np.min(((d @ precision) * d).sum(1))

        print(f"{preset}: Mahalanobis, full {dim} x {dim} precision: {1000 * median_seconds(mahalanobis, 200):.3f} ms")
    from catdog.training.models import load_efficientnet_lite_imagenet

    net = load_efficientnet_lite_imagenet("efficientnet_lite0").eval()
    for size in (224, 320):
        image = torch.from_numpy(rng.standard_normal((1, 3, size, size)).astype(np.float32))
        with torch.inference_mode():
            net(image)
            forward = median_seconds(lambda: net(image), 20)
        print(f"built-in: ImageNet Lite0 forward (eager PyTorch, batch 1, {size} px): {1000 * forward:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/ood"))
    parser.add_argument("--presets", nargs="+", default=["fast", "default"], choices=tuple(PRESETS))
    parser.add_argument("--keep", type=float, default=KEEP, help="share of validation photos the threshold keeps")
    parser.add_argument("--features-only", action="store_true", help="compute and cache the features, then stop")
    parser.add_argument("--skip-builtin", action="store_true")
    parser.add_argument("--builtin-sizes", nargs="+", type=int, default=[224, 320],
                        help="input sizes for the built-in model (224: its own; larger: FixRes, like the default preset)")
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--timings-only", action="store_true")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    print(f"# OOD research, {machine_description()}", flush=True)
    if args.timings_only:
        timings(args.presets)
        return
    photos = load_photos()
    for preset in args.presets:
        preset_features(preset, photos, args.scratch)
    if args.features_only:
        return
    for preset in args.presets:
        evaluation, stored = evaluate_preset(preset, photos, args.scratch, args.keep)
        for key in (("knn", "orig", 5, "first"), ("knn", "orig, 2000", 10, "first"), ("knn", "orig, 2000", 10, "mean"),
                    ("head", "msp", "first")):
            if key in stored:
                list_refused(preset, photos, stored, key, args.keep)
    if not args.skip_builtin:
        for size in args.builtin_sizes:
            evaluate_builtin(photos, args.scratch, size)
    if not args.skip_timings:
        timings(args.presets)


if __name__ == "__main__":
    main()
