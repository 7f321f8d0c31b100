"""The head strategy: a linear head trained on cached features of the frozen pretrained backbone.

The features of every training and validation photo (and its mirror image, with --flip) come from the feature
cache or one pass of the backbone (`features.py`); the head then trains on those vectors with the shared loop
(`loop.py`), in seconds per epoch. `catdog tune --strategy head` reuses `load_head_data` and `FeatureBatches`.

With --damage-views the training photos also give features of damaged copies (`corruptions.training_damage`: a
JPEG, a thumbnail, blur, ... drawn per photo), so the head learns what a damaged cat looks like to the frozen
backbone; the clean views stay as they were, and validation (the temperature, the mirror-view threshold, early
stopping) sees clean photos only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from catdog.training.checkpoint import save_training_state
from catdog.runtime.data import DataError, LabelledImages, default_num_workers
from catdog.training.datasets import Batch
from catdog.training.distributed import all_gather_objects, is_main_process, shard, shard_indices, world_size
from catdog.training.features import FeatureSet, cache_folder, default_cache_dir, extract_features
from catdog.runtime.images import ImageLoadError
from catdog.training.models import Classifier
from catdog.runtime.progress import progress_bar
from catdog.runtime.runs import LAST_CHECKPOINT_FILE
from catdog.training.config import TrainConfig
from catdog.training.loop import (
    Tracker,
    build_loss_function,
    build_optimizer,
    build_scheduler,
    epoch_generator,
    evaluate,
    rng_state,
    sampling_weights,
    seed_epoch,
    train_one_epoch,
)
from catdog.runtime.transforms import Preprocess


class FeatureBatches:
    """Mini-batches of cached feature vectors, shaped like image batches so the same loop trains on them."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                 seed: int = 0, epoch: int = 0, weights: torch.Tensor | None = None):
        self.features, self.labels, self.batch_size = features, labels, batch_size
        self.shuffle, self.seed, self.epoch, self.weights = shuffle, seed, epoch, weights

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        generator = epoch_generator(self.seed, self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, len(self.labels), replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(len(self.labels), generator=generator)
        else:
            order = torch.arange(len(self.labels))
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            yield Batch(self.features[chosen], self.labels[chosen], chosen, [])


@dataclass
class HeadData:
    """Cached features ready for head training: each view of a training image is one sample; validation keeps
    the views together ([images, views, dim]) so evaluation averages their logits."""

    train_samples: torch.Tensor
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    skipped: list[ImageLoadError]
    train_first_views: torch.Tensor | None = None  # [usable training photos, dim]: each one's clean original view
    # The taught "neither" examples' first views ([usable, dim]) and their positions in the list given (`--neither`)
    neither: tuple[np.ndarray, np.ndarray] | None = None


def load_head_data(config: TrainConfig, backbone: Callable[[], nn.Module], preprocess: Preprocess, train_images: LabelledImages,
                   val_images: LabelledImages, device: torch.device, log, deadline: float | None = None,
                   neither_paths: Sequence[Path] = ()) -> HeadData | None:
    """Features of every training and validation photo, from the cache or the backbone. With a deadline the
    extraction stops there (see `extract_features`) and the photos it did not reach are left out, said in the log.
    Under torchrun the ranks share the extraction (`extract_features_across_ranks`) and only rank 0 gets the data;
    the others get None. `neither_paths` (taught "neither" examples, `--neither`): their first view only."""
    views = ("original", "flipped") if config.flip else ("original",)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    workers = default_num_workers() - 1 if config.num_workers < 0 else config.num_workers
    # One pass over train and validation images together: one decoder process, one ONNX Runtime session.
    all_paths = train_images.paths + val_images.paths
    with progress_bar(config.progress and is_main_process(), len(shard(all_paths)), "features") as bar:
        feature_set = extract_features_across_ranks(all_paths, backbone, config.model, preprocess, views, device=device,
                                                    cache_dir=cache_dir, num_workers=workers, progress=bar.update,
                                                    deadline=deadline, seed=config.seed, batch_size=config.feature_batch_size)
    neither = None
    if neither_paths:  # the same backbone, one view: the automatic score compares first views too
        with progress_bar(config.progress and is_main_process(), len(shard(list(neither_paths))), "neither") as bar:
            neither_set = extract_features_across_ranks(list(neither_paths), backbone, config.model, preprocess, ("original",),
                                                        device=device, cache_dir=cache_dir, num_workers=workers,
                                                        progress=bar.update, deadline=deadline, seed=config.seed,
                                                        batch_size=config.feature_batch_size)
        if neither_set is not None:
            usable_neither = np.flatnonzero(neither_set.valid_mask())
            neither = (neither_set.features[usable_neither, 0], usable_neither)
            log(f"neither: features of {len(usable_neither)} of {len(neither_paths)} taught examples in {neither_set.seconds:.1f} s "
                f"({neither_set.computed} computed)" + (f", {len(neither_set.errors)} unreadable" if neither_set.errors else ""))
    if feature_set is None:  # another rank of a torchrun launch: it shares the damaged views' extraction too
        if config.damage_views:
            damaged_training_views(config, backbone, preprocess, train_images, None, device, cache_dir, workers, log, deadline)
        return None
    log(f"features: {len(all_paths)} images x {len(views)} views at {preprocess.input_size} px in {feature_set.seconds:.1f} s "
        f"({feature_set.computed} computed, {feature_set.from_cache(len(all_paths))} from cache)"
        + (f", {feature_set.batch_size.describe()}" if feature_set.batch_size else ""))
    count = len(train_images)
    if feature_set.not_reached:
        in_train = sum(1 for i in feature_set.not_reached if i < count)
        log(f"time budget: {len(feature_set.not_reached)} of {len(all_paths)} photos not reached ({in_train} train, "
            f"{len(feature_set.not_reached) - in_train} validation), left out of this run; a rerun continues from the cache")
    extracted = {"train": replace(feature_set, features=feature_set.features[:count]),
                 "val": replace(feature_set, features=feature_set.features[count:])}

    def usable(name: str, part: LabelledImages) -> tuple[torch.Tensor, torch.Tensor]:
        mask = extracted[name].valid_mask()
        labels = torch.tensor(part.labels)[torch.from_numpy(mask)]
        lost = set(range(len(part.class_names))) - set(labels.tolist())
        if lost:
            why = "was not reached within --time-budget" if feature_set.not_reached else "failed to load"
            raise DataError(f"every {name} image of class(es) {[part.class_names[i] for i in lost]} {why}")
        return torch.from_numpy(extracted[name].features[mask]), labels

    train_features, train_labels = usable("train", train_images)
    val_features, val_labels = usable("val", val_images)
    samples = train_features.reshape(-1, train_features.shape[-1])
    sample_labels = train_labels.repeat_interleave(len(views))
    if config.damage_views:
        usable_train = extracted["train"].valid_mask()
        damaged, damaged_labels = damaged_training_views(config, backbone, preprocess, train_images, usable_train, device,
                                                         cache_dir, workers, log, deadline)
        samples, sample_labels = torch.cat([samples, damaged]), torch.cat([sample_labels, damaged_labels])
    return HeadData(samples, sample_labels, val_features, val_labels, feature_set.errors, train_features[:, 0], neither)


def damaged_training_views(config: TrainConfig, backbone: Callable[[], nn.Module], preprocess: Preprocess,
                           train_images: LabelledImages, usable: np.ndarray | None, device: torch.device, cache_dir: Path,
                           workers: int, log, deadline: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of `config.damage_views` damaged views per training photo ("damaged-1", "damaged-2", ...; a
    fraction gives the last view to that share of the photos, a seeded choice) and their labels. Only photos whose
    clean views loaded (`usable`; None on the ranks of a torchrun launch other than 0, which only share the
    extraction) take part; with a deadline, photos not reached are left out of this part only."""
    whole, fraction = int(config.damage_views), config.damage_views - int(config.damage_views)
    candidates = np.arange(len(train_images))  # the same plan on every rank
    plan = [(f"damaged-{n + 1}", candidates) for n in range(whole)]
    if fraction > 0:
        chosen = np.random.default_rng(config.seed).permutation(candidates)[: round(fraction * len(candidates))]
        plan.append((f"damaged-{whole + 1}", np.sort(chosen)))
    features, labels, started = [], [], time.perf_counter()
    computed = reached = 0
    for view, positions in plan:
        paths = [train_images.paths[i] for i in positions]
        with progress_bar(config.progress and is_main_process(), len(shard(paths)), view) as bar:
            feature_set = extract_features_across_ranks(paths, backbone, config.model, preprocess, (view,), device=device,
                                                        cache_dir=cache_dir, num_workers=workers, progress=bar.update,
                                                        deadline=deadline, seed=config.seed, batch_size=config.feature_batch_size)
        if feature_set is None:  # another rank: rank 0 trains
            continue
        mask = feature_set.valid_mask() & usable[positions]
        features.append(torch.from_numpy(feature_set.features[mask, 0]))
        labels.append(torch.tensor(train_images.labels)[torch.from_numpy(positions[mask])])
        computed, reached = computed + feature_set.computed, reached + int(mask.sum())
    if not features:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    log(f"damaged views: {reached} features of damaged training photos ({config.damage_views:g} per photo; "
        f"{computed} computed) in {time.perf_counter() - started:.1f} s")
    return torch.cat(features), torch.cat(labels)


def extract_features_across_ranks(paths: list[Path], backbone: Callable[[], nn.Module], model_name: str,
                                  preprocess: Preprocess, views: tuple[str, ...], **options) -> FeatureSet | None:
    """`extract_features` shared by the ranks of a distributed run: each rank computes a disjoint share of the
    files into the feature cache (so K GPUs extract K times faster and each feature is computed once), then rank 0
    reads the whole set back from the cache and gets the FeatureSet one process would have; the other ranks get
    None. The cache folder must be one all ranks see (a shared file system when they run on several machines)."""
    if world_size() == 1:
        return extract_features(paths, backbone, model_name, preprocess, views, **options)
    positions = shard_indices(len(paths))
    mine = extract_features([paths[i] for i in positions], backbone, model_name, preprocess, views, **options)
    shares = all_gather_objects((mine.errors, mine.computed, [positions[i] for i in mine.not_reached], mine.seconds))
    if not is_main_process():
        return None
    options = {key: value for key, value in options.items() if key not in ("progress", "deadline")}
    whole = extract_features(paths, backbone, model_name, preprocess, views, compute_missing=False, **options)
    errors = [error for share in shares for error in share[0]]
    failed = {error.path for error in errors}
    reported_not_reached = {position for share in shares for position in share[2]}
    not_reached = [i for i in whole.not_reached if str(paths[i]) not in failed]
    lost = [i for i in not_reached if i not in reported_not_reached]
    if lost:
        folder = cache_folder(options["cache_dir"], model_name, preprocess, views[0])
        raise DataError(f"{paths[lost[0]]}: its features, computed by another rank, are not in the feature cache "
                        f"{folder}; put --cache-dir on a file system every machine of the run shares")
    return FeatureSet(whole.features, errors, max(share[3] for share in shares) + whole.seconds,
                      sum(share[1] for share in shares), not_reached)


def train_head(config: TrainConfig, model: Classifier, preprocess: Preprocess, train_images: LabelledImages,
               val_images: LabelledImages, device, run_dir: Path, resume_state, deadline: float | None, log,
               neither_paths: Sequence[Path] = ()):
    """Train `model.head` on cached features; return (history, skipped files, validation logits, validation
    labels, (training and validation features for the out-of-distribution score, and the taught "neither"
    examples' features with their positions in `neither_paths`, or None)). Under torchrun all ranks extract
    features, then rank 0 alone trains (seconds) and the others return None."""
    # Leave a tenth of the budget (at least 10 s) for training the head on what extraction reached.
    extraction_deadline = None if deadline is None else deadline - max(10.0, config.time_budget * 6)
    data = load_head_data(config, lambda: model.backbone, preprocess, train_images, val_images, device, log, extraction_deadline,
                          neither_paths)
    if data is None:
        return None
    train_samples, train_sample_labels = data.train_samples, data.train_labels
    val_features, val_labels, skipped = data.val_features, data.val_labels, data.skipped
    head = model.head
    loss_function = build_loss_function(config, train_sample_labels.tolist(), len(train_images.class_names))
    optimizer = build_optimizer(head.parameters(), config)
    steps_per_epoch = math.ceil(len(train_sample_labels) / config.batch_size)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    tracker = Tracker(config, run_dir, resume_state, deadline)
    best_head = {k: v.clone() for k, v in head.state_dict().items()}
    if resume_state:
        head.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        best_head = resume_state["best_model"]
    sample_weights = sampling_weights(config, train_sample_labels, len(train_images.class_names))
    val_batches = FeatureBatches(val_features, val_labels, 1024, shuffle=False)
    plain_loss = nn.CrossEntropyLoss()
    for epoch in range(tracker.start_epoch, config.epochs):
        seed_epoch(config.seed, epoch)
        batches = FeatureBatches(train_samples, train_sample_labels, config.batch_size, True, config.seed, epoch, sample_weights)
        result = train_one_epoch(head, batches, optimizer, scheduler, loss_function, torch.device("cpu"), config.grad_clip)
        val_loss, val_accuracy, _, _ = evaluate(head, val_batches, plain_loss, torch.device("cpu"))
        if tracker.record(epoch, result, val_loss, val_accuracy, scheduler.get_last_lr()[0]):
            best_head = {k: v.clone() for k, v in head.state_dict().items()}
        save_training_state(run_dir / LAST_CHECKPOINT_FILE, {
            **tracker.state(epoch), "model": head.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "best_model": best_head, "rng": rng_state()})
        reason = tracker.should_stop(result.seconds)
        if reason:
            log(reason)
            break
    if tracker.history:
        best = min(tracker.history, key=lambda row: row["val_loss"])
        log(f"head: {len(tracker.history)} epochs, best epoch {best['epoch']} val loss {best['val_loss']:.4f} "
            f"accuracy {best['val_accuracy']:.4f}")
    head.load_state_dict(best_head)
    tracker.close()
    evaluate(head, val_batches, plain_loss, torch.device("cpu"))  # puts the head in eval mode
    with torch.inference_mode():
        # Each view's logits, [images, views, classes]: train validates on their mean, and chooses on them which
        # photos predict gives the mirror view (`probabilities.choose_mirror_threshold`).
        val_view_logits = head(val_features)
    # The out-of-distribution score compares a photo's first view with the training photos' first (clean) views.
    ood_features = (data.train_first_views.numpy(), val_features[:, 0].numpy(), data.neither)
    return tracker.history, skipped, val_view_logits, val_labels, ood_features
