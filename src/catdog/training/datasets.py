"""PyTorch data loading: the dataset of image files, batches that skip unreadable files, loader options.
Training layer (torch); listing and splitting data sets is `catdog.runtime.data`, which needs no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from catdog.runtime.images import ImageLoadError, load_image


class ImageFileDataset:
    """Images from disk through the shared loader and a transform. A bad file yields `None` instead of crashing;
    `collate_skipping_bad_images` drops it from the batch and reports its path. A map-style dataset for
    torch's DataLoader (any class with `__len__` and `__getitem__` is one), so that listing data needs no torch."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None,
        transform: Callable,
        draft_size: int | None = None,
        max_pixels: int | None = None,
    ):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.draft_size = draft_size
        self.loader_options = {} if max_pixels is None else {"max_pixels": max_pixels}
        # Set by training for each epoch: the random transform of image i then depends on (augmentation_seed, i)
        # alone, not on which process or loader worker draws it, so K processes under torchrun augment every
        # image exactly as one process would. None: the transform draws from the worker's generator as usual.
        self.augmentation_seed: int | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            image = load_image(path, draft_size=self.draft_size, **self.loader_options)
        except ImageLoadError as error:
            return {"index": index, "error": error}
        if self.augmentation_seed is None:
            return {"index": index, "image": self.transform(image), "label": self.labels[index]}
        with torch.random.fork_rng(devices=[]):  # the caller's generator state is left as it was
            torch.manual_seed(self.augmentation_seed * 1_000_003 + index)
            transformed = self.transform(image)
        return {"index": index, "image": transformed, "label": self.labels[index]}


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    errors: list[ImageLoadError]


def collate_skipping_bad_images(samples: list[dict]) -> Batch:
    """A batch of the samples that loaded; images from the evaluation transform (NumPy) and from augmentation
    (tensors) alike become one tensor."""
    good = [sample for sample in samples if "image" in sample]
    errors = [sample["error"] for sample in samples if "error" in sample]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), errors)
    return Batch(
        torch.stack([torch.as_tensor(sample["image"]) for sample in good]),
        torch.tensor([sample["label"] for sample in good], dtype=torch.long),
        torch.tensor([sample["index"] for sample in good], dtype=torch.long),
        errors,
    )


def dataloader_options(device: torch.device, num_workers: int) -> dict:
    """Workers decode in parallel with the model; pinned memory only pays off when copying to a GPU."""
    options = {"num_workers": num_workers, "pin_memory": device.type == "cuda", "collate_fn": collate_skipping_bad_images}
    if num_workers > 0:
        options["persistent_workers"] = False
        options["prefetch_factor"] = 4
    return options
