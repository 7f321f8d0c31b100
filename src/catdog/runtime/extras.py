"""Which optional parts of catdog are installed. `pip install catdog` is the runtime (predict, serve and explain an
exported model file); training and the rest come with extras. A command that needs a missing extra stops with one
line naming it (`MissingExtra`, exit code 2), not an ImportError's traceback. Runtime layer: imports nothing."""

from __future__ import annotations

import importlib.util

# extra -> the packages whose presence means it is installed
EXTRAS = {
    "train": ("torch", "torchvision", "timm", "sklearn", "matplotlib", "onnx"),
    "tune": ("optuna",),
}


class MissingExtra(Exception):
    """A command needs an extra that is not installed; the message says which and how to install it."""


def missing_packages(extra: str) -> list[str]:
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require_extra(*extras: str, what: str) -> None:
    """Raise MissingExtra when any of `extras` is not installed: "<what> needs catdog[train]: pip install ..."."""
    missing = [extra for extra in extras if missing_packages(extra)]
    if missing:
        spec = f"catdog[{','.join(extras)}]"
        raise MissingExtra(f"{what} needs {spec} (missing: {', '.join(name for e in missing for name in missing_packages(e))}): "
                           f"pip install '{spec}'")


def installed(extra: str) -> bool:
    return not missing_packages(extra)
