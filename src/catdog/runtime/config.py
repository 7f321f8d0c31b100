"""The runtime commands' options, one dataclass per command, documented field by field: `PredictConfig` and
`ExplainConfig` (`ServeConfig` is `catdog/serve/config.py`). The command line is built from them (`catdog.cli`);
this module imports no command's implementation, so `--help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from catdog.runtime.options import option


@dataclass
class PredictConfig:
    paths: list[str] = option([], "image files and/or folders (searched recursively)")
    model: str = option("", "exported model file (model.onnx from `catdog export`): all that prediction needs", metavar="FILE")
    run: str = option("", "run directory (its model.onnx, or exported on the fly with catdog[train]); neither --model nor --run: the built-in zero-training cat/dog model")
    output: str = option("predictions.csv", "CSV of path,label,confidence,prob_<class>...; -: standard output (messages go to standard error)")
    submission: str = option("", "also write a Kaggle submission CSV (id,label = probability of dog)")
    errors: str = option("", "CSV listing files that could not be read; empty: <output>.errors.csv (none with --output -)")
    clip: float = option(0.005, "submission: clip probabilities to [clip, 1 - clip] (bounds the log-loss penalty)")
    tta: bool | None = option(None, "test-time augmentation (average over the image and its mirror image); default: as the run was validated")
    check_orientation: bool = option(False, "off by default: read a photo that looks turned a quarter (no EXIF) the way up the network reads best. Measured: sideways photos 92.5% -> 94.9% right, but on original-size Kaggle photos it turned an upright photo into a confident wrong answer (dog 0.98 -> cat 0.9999); see the README (runs trained by catdog >= 0.5)")
    ood_keep: float | None = option(None, "say \"neither\" above the out-of-distribution score that keeps this share of the run's validation photos; default: the run's threshold (99%)")
    backend: str = option("auto", "auto (ONNX Runtime; PyTorch on a CUDA machine with catdog[train]), torch or onnxruntime", choices=("auto", "torch", "onnxruntime"))
    batch_size: int = option(0, "images per inference batch; 0: the fastest on this machine, measured once per model and machine (from 200 photos; kept in the cache folder), else 4 on a CPU and 64 on a GPU")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    cache_dir: str = option("", "where models exported on the fly and the measured batch sizes are kept; empty: $CATDOG_CACHE or ~/.cache/catdog")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        if not self.paths:
            raise ValueError("give at least one image file or folder")
        if self.model and self.run:
            raise ValueError("give --model or --run, not both")
        if not 0.0 <= self.clip < 0.5:
            raise ValueError("--clip must be in [0, 0.5)")
        if self.batch_size < 0:
            raise ValueError("--batch-size must be 0 (automatic) or more")
        if self.ood_keep is not None and not 0.0 < self.ood_keep <= 1.0:
            raise ValueError("--ood-keep must be in (0, 1]")



@dataclass
class ExplainConfig:
    paths: list[str] = option([], "image files and/or folders (searched recursively)")
    model: str = option("", "exported model file (model.onnx from `catdog export`)", metavar="FILE")
    run: str = option("", "run directory (its model.onnx, or exported on the fly with catdog[train]); neither: the built-in zero-training cat/dog model")
    output: str = option("explanations", "folder for <photo>.gradcam.png and explanations.csv")
    tta: bool | None = option(None, "explain the photo and its mirror image together; default: as the run was validated")
    check_orientation: bool = option(False, "explain a photo that looks turned a quarter the way up predict --check-orientation reads it (off by default, as in predict)")
    cache_dir: str = option("", "where models exported on the fly are kept; empty: $CATDOG_CACHE or ~/.cache/catdog")

    def __post_init__(self):
        if not self.paths:
            raise ValueError("give at least one image file or folder")
        if self.model and self.run:
            raise ValueError("give --model or --run, not both")
        if not self.output:
            raise ValueError("--output must name a folder")
