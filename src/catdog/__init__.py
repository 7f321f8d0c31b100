"""catdog: train, evaluate, tune, export and serve image classifiers.

The package has three layers, one folder each, importing downward only:
- `catdog.runtime`: predict and explain with an exported model file (NumPy, Pillow, ONNX Runtime; never torch);
  `catdog.serve`, the web service, is built on it;
- `catdog.training`: train, evaluate, tune, export, report, the data tools (torch, timm, scikit-learn, Optuna);
- the top: `catdog.cli` (the `catdog` command), `catdog.api` (the Python API) and `catdog.model_files` (which
  model file a command runs, exporting a run with the training layer when it must).

The Python API is reachable from the package: `catdog.train(...)`, `catdog.evaluate(...)`, `catdog.tune(...)`,
`catdog.load(...)`, `catdog.Run`, `catdog.Model`, `catdog.Prediction` are the functions and classes of
`catdog.api`, imported when first used, so `import catdog` stays fast and never imports torch. The commands'
modules live in their layer (`catdog.training.train`, `catdog.runtime.predict`), so each name has one meaning.
"""

import importlib

from catdog.runtime.version import __version__

API_NAMES = ("train", "evaluate", "tune", "load", "Run", "Model", "Prediction")
__all__ = ["__version__", *API_NAMES]


def __getattr__(name):
    if name in API_NAMES:
        return getattr(importlib.import_module("catdog.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(API_NAMES))
