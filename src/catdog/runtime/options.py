"""Building command-line options from dataclass configs (one dataclass per command, as litgpt does).

Each field becomes `--field-name`; its help text comes from `field(metadata={"help": ...})`. A YAML or JSON file
given with `--config` supplies values first; explicit command-line options win over it. A list field takes one or
more values (`--image-sizes 224 160`); one marked `repeatable=True` may also be given again and adds up
(`--data a --data b` is `--data a b`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

ConfigT = TypeVar("ConfigT")


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its command-line help text."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def _base_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(arguments[0])
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, positional: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        kind = _base_type(hints[field.name])
        # argparse formats help with %: a literal one ("99%") must be doubled, or --help fails.
        help_text = field.metadata.get("help", "").replace("%", "%%")
        choices = field.metadata.get("choices")
        if field.name in positional:
            parser.add_argument(field.name, nargs="*" if typing.get_origin(kind) is list else None, help=help_text)
            continue
        flag = "--" + field.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) in (list, tuple):
            action = "extend" if field.metadata.get("repeatable") else "store"
            parser.add_argument(flag, dest=field.name, nargs="+", action=action, default=None,
                                metavar=field.metadata.get("metavar"), help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=kind if kind in (int, float) else str, choices=choices,
                                metavar=field.metadata.get("metavar"), default=None, help=help_text + _default_text(field))


def _default_text(field: dataclasses.Field) -> str:
    if field.default is dataclasses.MISSING or field.default in (None, ""):
        return ""
    return f" (default: {field.default})"


def load_config_file(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    values = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of option names to values")
    return {key.replace("-", "_"): value for key, value in values.items()}


def config_from_arguments(config_class: type[ConfigT], arguments: argparse.Namespace, config_file: str | None = None) -> ConfigT:
    names = {field.name for field in dataclasses.fields(config_class)}
    values: dict[str, Any] = {}
    if config_file:
        from_file = load_config_file(config_file)
        unknown = sorted(set(from_file) - names)
        if unknown:
            raise ValueError(f"{config_file}: unknown option(s) {', '.join(unknown)}")
        values.update(from_file)
    for name in names:
        value = getattr(arguments, name, None)
        if value is not None:
            values[name] = value
    hints = typing.get_type_hints(config_class)
    for name, value in list(values.items()):
        if typing.get_origin(_base_type(hints[name])) is tuple and isinstance(value, list):
            values[name] = tuple(float(v) for v in value)
    return config_class(**values)
