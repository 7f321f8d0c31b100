"""`catdog train`'s options and the choices made from them before training starts: the presets, the strategy
(head or finetune), the input size, and the strategy's default epochs, batch size and learning rate.

The bottom of the training package: the loop (`loop.py`), the strategies (`head.py`, `finetune.py`) and the
command (`catdog/training/train.py`) build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from catdog.runtime.images import DEFAULT_MAX_PIXELS
from catdog.runtime.options import option

PRESETS = {
    # Measured on the 6,000 shared Kaggle photos, 80/20 split, 2-core CPU (BENCHMARKS.md, 2026-11-28):
    # fast: Lite0 features of each photo and its mirror image at Lite0's own 224 px: 98.7% validation accuracy,
    # log loss 0.036, 2.6 min from raw JPEGs. default: Lite2 features at 300 px instead of its own 260 (see
    # `resolve_preprocess`): 99.3%, log loss 0.019, 6.3 min. Both validate and predict with mirror-image averaging;
    # a second run over the same photos reuses the cached features (16 s).
    # damage_views: off by default. Half a damaged copy per training photo (corruptions.py) raised the default run's
    # mean accuracy under the stronger damage from 96.96% to 97.53% but made its clean log loss worse (0.0191 ->
    # 0.0215) for about 1.2x a cold run's extraction; 1 and 2 copies add little more (97.66%, 97.70%). A linear head
    # on frozen features cannot undo sideways photos (94%) or heavy noise (96%), so the option is there
    # (`--damage-views 0.5`) but a clean photo's answer is not made worse by default (BENCHMARKS.md, "Damaged photos").
    # denoise_above: the noise filter (`transforms.DENOISE_ABOVE`) is off in both presets. Chosen on the 200 px
    # validation photos it helped Lite2 at 300 px on sigma-25 noise (95.3% -> 96.5%), but on the 800 original-size
    # photos it was not chosen on it did harm: strong noise 97.25% / log loss 0.092 -> 96.37% / 0.119 at test time,
    # one photo confidently wrong (cat 0.56 -> dog 0.97), clean log loss slightly worse (BENCHMARKS.md, "Defaults on
    # original-size photos"). `--denoise-above 10` turns it on.
    "fast": {"model": "efficientnet_lite0", "flip": True, "feature_image_size": 0, "damage_views": 0.0, "denoise_above": 0.0},
    "default": {"model": "efficientnet_lite2", "flip": True, "feature_image_size": 300, "damage_views": 0.0,
                "denoise_above": 0.0},
}
# `--neither-keep`: the taught examples' head keeps this share of the validation photos (`training/neither.py` says
# why this value: at 99.5% it refused 1.75% of the original-size Kaggle photos).
NEITHER_KEEP = 0.998
# history.csv: one row per epoch, written by `loop.Tracker`
HISTORY_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds", "images_per_second"]


def as_list(value) -> list[str]:
    """A list option's values as strings; one string (as config files written before it was a list hold) is a
    one-item list, an empty one none."""
    if value is None or isinstance(value, (str, Path)):
        return [str(value)] if value else []
    return [str(item) for item in value if str(item)]


@dataclass
class TrainConfig:
    data: list[str] = option([], "data set: a folder (Kaggle flat, class sub-folders, PetImages) or a CSV manifest; repeatable (--data A --data B, or --data A B): several sources, each in its own layout, merged with byte-identical copies left out and reported, then one split", repeatable=True, metavar="DIR")
    out: str = option("runs/latest", "run directory to create")
    preset: str = option("default", "fast: EfficientNet-Lite0 features at 224 px; default: Lite2 features at 300 px (2.4x slower, more accurate); both with mirror images", choices=tuple(PRESETS))
    model: str = option("", "model name (see `catdog models`); empty: the preset's model")
    strategy: str = option("auto", "head: train a linear head on cached frozen features; finetune: train the network; auto: head on CPU, and on CUDA below 2,000 training images, else finetune", choices=("auto", "head", "finetune"))
    pretrained: bool = option(True, "start from ImageNet weights (offline); --no-pretrained trains from scratch")
    freeze_backbone: bool = option(False, "finetune only the head (feature extractor)")
    unfreeze: float = option(1.0, "finetune: fraction of the backbone's weights that train, counted from its output end (0: only the head; 1: all)")
    augmentation: float = option(1.0, "finetune: augmentation strength from 0 (random crops of the whole photo only) to 1 (the tutorial's crops, flips, rotation and colour jitter)")
    flip: bool | None = option(None, "head strategy: also use mirror-image features (training and test-time); default from preset")
    damage_views: float | None = option(None, "head strategy: damaged copies (JPEG, thumbnail, blur, grey, dark, noise, screenshot, sideways; catdog/training/corruptions.py) per training photo whose features the head also trains on, for robustness to damaged photos; a fraction gives one to that share of the photos; 0: none; default from preset", metavar="N")
    epochs: int = option(0, "epochs; 0: the strategy's default (head 40, finetune 10)")
    batch_size: int = option(0, "batch size, global: under torchrun split evenly among the processes; 0: the strategy's default (head 256, finetune 32)")
    lr: float = option(0.0, "peak learning rate; 0: the strategy's default (head 3e-3, finetune 3e-4, from scratch 1e-3)")
    weight_decay: float = option(1e-4, "weight decay (decoupled for AdamW)")
    optimizer: str = option("adamw", "optimizer", choices=("adamw", "adam", "sgd"))
    scheduler: str = option("cosine", "learning-rate schedule after warmup", choices=("cosine", "step", "none"))
    warmup_epochs: float = option(1.0, "linear warmup length in epochs")
    step_size: int = option(7, "step schedule: epochs between decays")
    gamma: float = option(0.1, "step schedule: decay factor")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    grad_clip: float = option(1.0, "clip the gradient norm to this value; 0 disables")
    early_stopping: int = option(8, "stop after this many epochs without a better validation loss; 0 disables")
    class_balance: str = option("none", "imbalanced data: weights (class-weighted loss) or sampler (weighted sampling)", choices=("none", "weights", "sampler"))
    val_fraction: float = option(0.2, "fraction of each class held out for validation")
    seed: int = option(42, "random seed (split, initialisation, shuffling, augmentation)")
    layout: str = option("auto", "data layout", choices=("auto", "kaggle", "folders", "csv"))
    denoise_above: float | None = option(None, "a photo whose estimated sensor noise (grey levels of 255) is above this gets a 3x3 median filter before resizing, in training and in every prediction (it travels with the run; see catdog/runtime/transforms.py); 0: off (the default: it harmed original-size noisy photos; see BENCHMARKS.md); 10 is the measured setting")
    image_size: int = option(0, "input size in pixels; 0: the preset's feature size for the head strategy with the preset's model (default preset: 300), else the model's own")
    num_workers: int = option(-1, "data-loading worker processes; -1: automatic")
    feature_batch_size: int = option(0, "head strategy: images per backbone batch when extracting features; 0: the size the backbone runs fastest at on this machine (measured once per model and machine, from 200 images; kept in the cache folder)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    amp: bool = option(True, "mixed precision on CUDA")
    calibrate: bool = option(True, "fit a temperature on the validation split to calibrate probabilities (never sharpening below T = 1 unless validation has >= 500 images and >= 5 errors; see calibration.py)")
    ood_keep: float = option(0.99, "\"neither\": the out-of-distribution threshold keeps this share of the validation photos (see catdog/training/ood.py)")
    neither: list[str] = option([], "a folder of photos that are none of the classes (any layout, sub-folders searched): examples of what to answer \"neither\" to, never a class of the model and never counted in its accuracy; repeatable. The run learns a head of them against the training photos and keeps a bank of them; a photo the head puts on their side, or nearer one of them than any validation photo is, is refused, naming the nearest example (see catdog/training/neither.py)", repeatable=True, metavar="DIR")
    neither_keep: float = option(NEITHER_KEEP, "with --neither: the threshold of the taught examples' head (training photos against examples) is chosen to keep this share of the validation photos (see catdog/training/neither.py)")
    exclude: str = option("", "leave out the photos this file lists: a label_issues.csv from `catdog data issues` (its flagged rows) or a plain list of paths, one per line (like `data audit`'s quarantine.txt)", metavar="FILE")
    time_budget: float = option(0.0, "minutes for the whole run (0: no limit); head strategy: feature extraction stops in time to train the head (a tenth of the budget, at least 10 s) on the photos it reached, and a rerun continues from the cache; training stops after the last epoch that fits")
    cache_dir: str = option("", "feature and ONNX cache folder; empty: $CATDOG_CACHE or ~/.cache/catdog")
    resume: str = option("", "run directory of an interrupted run to continue from its last complete epoch", metavar="RUN")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self):
        from catdog.training.models import get_model_spec  # torch: only once a command runs, never for --help

        self.data, self.neither = as_list(self.data), as_list(self.neither)  # one string: a config file from catdog < 0.7
        if not self.data and not self.resume:
            raise ValueError("--data is required")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[self.preset]
        self.model = self.model or preset["model"]
        get_model_spec(self.model)  # fails early on an unknown name, listing the valid ones
        if self.flip is None:
            self.flip = preset["flip"]
        if self.damage_views is None:
            self.damage_views = preset["damage_views"]
        if self.denoise_above is None:  # the filter was measured on the presets' own models only
            self.denoise_above = preset["denoise_above"] if self.model == preset["model"] else 0.0
        if not 0.0 <= self.damage_views <= 8.0:
            raise ValueError(f"damage_views must be between 0 and 8, got {self.damage_views}")
        if not get_model_spec(self.model).pretrained_by_default:
            self.pretrained = False
        for name in ("epochs", "batch_size", "step_size", "early_stopping", "image_size", "feature_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.lr < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.time_budget < 0 or self.denoise_above < 0:
            raise ValueError("lr, weight_decay, grad_clip, time_budget and denoise_above must not be negative")
        if not (0.0 <= self.unfreeze <= 1.0 and 0.0 <= self.augmentation <= 1.0):
            raise ValueError("unfreeze and augmentation must be between 0 and 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be between 0 and 1")
        if not 0.0 < self.ood_keep <= 1.0:
            raise ValueError("ood_keep must be in (0, 1]")
        if not 0.0 < self.neither_keep <= 1.0:
            raise ValueError("neither_keep must be in (0, 1]")


@dataclass
class EvaluateConfig:
    run: str = option("", "run directory made by `catdog train`")
    data: str = option("", "labelled data; empty: the run's own validation split")
    out: str = option("", "folder for metrics.json and the plots; empty: <run>/evaluation")
    layout: str = option("auto", "data layout", choices=("auto", "kaggle", "folders", "csv"))
    tta: bool | None = option(None, "test-time augmentation (average over the image and its mirror image); default: as the run was validated")
    backend: str = option("auto", "inference backend", choices=("auto", "torch", "onnxruntime"))
    batch_size: int = option(64, "images per inference batch")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    feature_cache: bool = option(True, "runs trained with the head strategy: score through the cached backbone features, as training validated (--no-feature-cache runs the whole network on every image)")
    cache_dir: str = option("", "feature and model-file cache folder; empty: $CATDOG_CACHE or ~/.cache/catdog")
    mistakes_shown: int = option(24, "how many of the most confidently misclassified images mistakes.png shows")
    ood_data: str = option("", "a folder of photos that show none of the classes: measure how well the run says \"neither\" (AUROC, shares accepted and refused at its threshold, ood_scores.png)", metavar="DIR")
    check_orientation: bool = option(False, "with --corruptions: read a photo that looks turned a quarter the way up the network reads best, as predict --check-orientation does (off by default, as in predict; the other figures are as the run was validated, without it)")
    corruptions: bool = option(False, "also score the photos under common damage (JPEG, thumbnail, blur, grey, dark, noise, screenshot, sideways; each at two severities, catdog/training/corruptions.py): a table in metrics.json (`corruptions`) and corruptions.png; head runs through the feature cache (damaged views are cached too), others through the predictor; minutes on a CPU")

    def __post_init__(self):
        if not self.run:
            raise ValueError("--run is required")
        if self.mistakes_shown < 0:
            raise ValueError(f"--mistakes-shown must be >= 0, got {self.mistakes_shown}")



@dataclass
class ExportConfig:
    run: str = option("", "run directory made by `catdog train`")
    builtin: bool = option(False, "export the built-in zero-training cat/dog model instead of a run")
    format: str = option("onnx", "onnx: the deployable file predict and serve run without torch; torchscript: the PyTorch network alone", choices=("onnx", "torchscript"))
    out: str = option("", "output file; empty: <run>/model.onnx (or model.torchscript.pt), catdog-builtin.onnx for --builtin")
    parity_images: int = option(32, "images in the PyTorch-vs-export parity check")

    def __post_init__(self):
        if bool(self.run) == bool(self.builtin):
            raise ValueError("give --run RUN or --builtin")
        if self.format not in ("onnx", "torchscript"):
            raise ValueError("--format must be onnx or torchscript")
        if self.parity_images < 1:
            raise ValueError("--parity-images must be at least 1")



@dataclass
class ReportConfig:
    run: str = option("", "run directory made by `catdog train`")
    data: str = option("", "labelled data to report on; empty: the run's own validation split")
    output: str = option("report.html", "the HTML file to write")
    layout: str = option("auto", "data layout", choices=("auto", "kaggle", "folders", "csv"))
    mistakes: int = option(8, "how many of the most confidently wrong photos to show with Grad-CAM overlays")
    samples: int = option(12, "how many photos the sample grid shows")
    label_issues: str = option("", "label_issues.csv of `catdog data issues`; empty: <run>/label_issues.csv, else found now")
    find_label_issues: bool = option(True, "search the run's data for label errors when no label_issues.csv is at hand")
    issues_shown: int = option(12, "how many likely label errors to show")
    bootstrap: int = option(1000, "bootstrap resamples for the metrics' 95% intervals")
    device: str = option("auto", "where Grad-CAM and the label-error search run: auto, cpu, cuda or cuda:N")
    seed: int = option(0, "seed of the sample grid and the bootstrap")
    ood_data: str = option("", "a folder of photos showing none of the classes: the Saying neither section measures the run's out-of-distribution score against them (evaluate --ood-data)", metavar="DIR")
    corruptions: bool = option(True, "the Damaged photos section: accuracy and log loss under common damage (evaluate --corruptions), run now when the evaluation has none (minutes on a CPU for a large validation split)")

    def __post_init__(self):
        if not self.run:
            raise ValueError("--run is required")
        for name in ("mistakes", "samples", "issues_shown"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if self.bootstrap < 100:
            raise ValueError("--bootstrap must be at least 100")



STRATEGIES = ("head", "finetune")


@dataclass
class TuneConfig:
    data: str = option("", "data set folder or CSV manifest")
    out: str = option("runs/tune", "folder for study.db (the default storage), trials.csv, best_config.yaml, study.json and the plots")
    strategy: str = option("head", "head: tune the linear head on cached features; finetune: tune fine-tuning of the network", choices=STRATEGIES)
    preset: str = option("default", "preset whose model (and flip setting) the trials use", choices=tuple(PRESETS))
    model: str = option("", "model name (see `catdog models`); empty: the preset's model")
    storage: str = option("", "Optuna storage URL; empty: sqlite:///<out>/study.db (rerunning continues the study); postgresql://user:password@host/db shares one study between workers")
    study: str = option("", "study name in the storage; empty: catdog-<strategy>")
    heartbeat: int = option(60, "seconds between a worker's heartbeats; a trial without one for twice as long is failed and retried (0: off)")
    trials: int = option(30, "trials this process runs (several workers on one study add theirs up)")
    timeout: float = option(0.0, "stop starting trials after this many minutes (0: no limit)")
    max_epochs: int = option(0, "head: largest number of epochs a trial may ask for (0: 40); finetune: epochs of every trial (0: 5)")
    image_sizes: list[int] = option([], "finetune: input sizes to try; empty: the model's own and three quarters of it")
    seed: int = option(42, "seed for the split and the trials; the sampler's seed also mixes in the trials already in the study and the process id")
    val_fraction: float = option(0.2, "fraction of each class held out for validation")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    num_workers: int = option(-1, "finetune: data-loading worker processes; -1: automatic")
    progress: bool = option(True, "show progress bars while extracting features")

    def __post_init__(self):
        if not self.data:
            raise ValueError("--data is required")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self.max_epochs = self.max_epochs or (40 if self.strategy == "head" else 5)
        if self.trials < 1 or self.max_epochs < 1:
            raise ValueError("--trials and --max-epochs must be at least 1")
        if self.strategy == "head" and self.max_epochs < 2:
            raise ValueError("--max-epochs must be at least 2 for the head strategy")
        if self.heartbeat < 0 or self.timeout < 0:
            raise ValueError("--heartbeat and --timeout must not be negative")
        self.image_sizes = [int(size) for size in self.image_sizes]
        if any(size < 16 for size in self.image_sizes):
            raise ValueError("--image-sizes must be at least 16 pixels")
        self.study = self.study or f"catdog-{self.strategy}"
        self.storage = self.storage or f"sqlite:///{(Path(self.out) / 'study.db').resolve()}"



@dataclass
class InspectConfig:
    data: str = option("", "data set folder or CSV manifest")
    out: str = option("", "folder for the report and the sample grid; empty: ./inspect-<data name>")
    layout: str = option("auto", "data layout", choices=("auto", "kaggle", "folders", "csv"))
    samples_per_class: int = option(8, "images per class in the sample grid")
    seed: int = option(0, "which samples go in the grid")

    def __post_init__(self):
        if not self.data:
            raise ValueError("give a data folder or manifest")
        if self.samples_per_class < 1:
            raise ValueError("--samples-per-class must be at least 1")



NEAR_DUPLICATE_BITS = 24  # of 256: resized, re-encoded or lightly edited copies land within this distance


@dataclass
class AuditConfig:
    data: str = option("", "data set folder or CSV manifest (a folder without labels is audited too)")
    out: str = option("", "folder for audit.json and quarantine.txt; empty: ./audit-<data name>")
    layout: str = option("auto", "data layout", choices=("auto", "kaggle", "folders", "csv"))
    workers: int = option(0, "decoding processes; 0: one per CPU core")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "images with more pixels are flagged (and refused by the loader)")
    near_duplicate_bits: int = option(NEAR_DUPLICATE_BITS, "perceptual-hash distance (of 256 bits) counted as near duplicate")

    def __post_init__(self):
        if not self.data:
            raise ValueError("give a data folder or manifest")
        if not 0 <= self.near_duplicate_bits <= 64:
            raise ValueError("--near-duplicate-bits must be in 0..64")



@dataclass
class LabelIssuesConfig:
    data: str = option("", "labelled data set: a folder (Kaggle flat, class sub-folders) or a CSV manifest")
    preset: str = option("default", "the features of this `catdog train` preset (fast: Lite0 at 224 px; default: Lite2 at 300 px)", choices=("fast", "default"))
    output: str = option("label_issues.csv", "CSV of every photo, most suspicious first; the grid goes beside it as <name>.png")
    folds: int = option(5, "k: out-of-fold probabilities from k heads, each trained on the other folds")
    shown: int = option(24, "how many of the most suspicious photos the PNG grid shows")
    layout: str = option("auto", "data layout", choices=("auto", "kaggle", "folders", "csv"))
    seed: int = option(42, "random seed of the folds")
    device: str = option("auto", "where the backbone runs on a feature-cache miss: auto, cpu, cuda or cuda:N")
    cache_dir: str = option("", "feature cache folder; empty: $CATDOG_CACHE or ~/.cache/catdog")
    progress: bool = option(True, "show a progress bar while features are computed")

    def __post_init__(self):
        if not self.data:
            raise ValueError("give a labelled data folder or manifest")
        if self.folds < 2:
            raise ValueError(f"--folds must be at least 2, got {self.folds}")
        if self.shown < 0:
            raise ValueError(f"--shown must be >= 0, got {self.shown}")
        if not self.output.lower().endswith(".csv"):
            raise ValueError(f"--output must be a .csv file, got {self.output!r}")
