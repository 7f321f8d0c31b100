"""catdog: train, evaluate, tune, export and serve image classifiers.

The package is a library; `catdog.cli` is a thin command-line layer on top of it. Each step of the pipeline lives
in the module named after it: `images` (the one image loader), `data` (layouts, splits, datasets, inspection),
`transforms` (preprocessing presets), `models` (model factories and offline pretrained weights), `features`
(the frozen-backbone feature cache), `train`, `evaluate`, `predict`, `export`, `tune`, `audit` and `serve`.

The Python API (`catdog.api`) is reachable from the package: `catdog.train(...)`, `catdog.evaluate(...)`,
`catdog.tune(...)`, `catdog.load(...)`, `catdog.Run`, `catdog.Model`, `catdog.Prediction`. Nothing is imported
until first used, so `import catdog` stays fast and does not import torch.

`train`, `evaluate` and `tune` are also the names of the modules that implement those commands. Rather than one
name hiding the other, those three modules are callable: `catdog.train(data=...)` calls `catdog.api.train`, while
`import catdog.train`, `catdog.train.TrainConfig` and `from catdog.train import train` keep meaning the module.
The package's module class makes a command module callable when Python's import system binds it as an attribute
of the package (which it does for every submodule import, however it is spelled).
"""

import importlib
import sys
import types

__version__ = "0.5.2"

_API_NAMES = ("train", "evaluate", "tune", "load", "Run", "Model", "Prediction")
_CALLABLE_MODULES = ("train", "evaluate", "tune")


class _CommandModule(types.ModuleType):
    """`catdog.train`, `catdog.evaluate`, `catdog.tune`: the command's module, and callable as its API function."""

    def __call__(self, *args, **kwargs):
        api_function = getattr(importlib.import_module("catdog.api"), self.__name__.rpartition(".")[2])
        return api_function(*args, **kwargs)

    @property
    def __signature__(self):  # what help() and a notebook's call tips show for `catdog.train(`
        import inspect

        return inspect.signature(getattr(importlib.import_module("catdog.api"), self.__name__.rpartition(".")[2]))


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _CALLABLE_MODULES and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value.__class__ = _CommandModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _CALLABLE_MODULES:
        return importlib.import_module(f"{__name__}.{name}")  # binding it to the package makes it callable
    if name in _API_NAMES:
        return getattr(importlib.import_module(f"{__name__}.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API_NAMES))
