"""The `catdog` command: a thin layer that turns options into the library's config dataclasses.

Exit codes: 0 success; 1 the job failed (bad data, bad run directory, training error); 2 bad command-line usage;
3 `predict` (or `explain`) wrote its output but some input files could not be read (listed on stderr, and for predict in the errors CSV).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from catdog.config import add_config_arguments, config_from_arguments
from catdog.extras import MissingExtra, installed, require_extra

EXIT_FAILED = 1
EXIT_USAGE = 2


def _command_train(arguments) -> int:
    from catdog.train import TrainConfig, train

    config = config_from_arguments(TrainConfig, arguments, arguments.config)
    train(config)
    return 0


def _command_evaluate(arguments) -> int:
    from catdog.evaluate import EvaluateConfig, evaluate_run

    evaluate_run(config_from_arguments(EvaluateConfig, arguments, arguments.config))
    return 0


def _command_predict(arguments) -> int:
    from catdog.model_files import load_predictor
    from catdog.predict import PredictConfig, collect_or_fail, launched_processes, run_predict
    from catdog.runs import check_not_pickle

    config = config_from_arguments(PredictConfig, arguments, arguments.config)
    check_not_pickle(config.model or config.run)  # the more fundamental mistake is named first
    collect_or_fail(config.paths)  # nothing to predict: say so before loading (or exporting) a model
    if launched_processes() > 1:  # under torchrun: the ranks share the files (torch.distributed)
        require_extra("train", what="predicting under torchrun")
        from catdog.backends import run_predict_across_ranks  # the training layer, installed (checked above)

        return run_predict_across_ranks(config)
    predictor = load_predictor(config.model, config.run, config.backend, config.device, config.cache_dir or None,
                               ood_keep=config.ood_keep)
    return run_predict(config, predictor)


def _command_inspect(arguments) -> int:
    from catdog.inspect_data import InspectConfig, inspect_data

    inspect_data(config_from_arguments(InspectConfig, arguments, arguments.config))
    return 0


def _command_audit(arguments) -> int:
    from catdog.audit import AuditConfig, run_audit

    return run_audit(config_from_arguments(AuditConfig, arguments, arguments.config))


def _command_issues(arguments) -> int:
    from catdog.label_issues import LabelIssuesConfig, run_label_issues

    return run_label_issues(config_from_arguments(LabelIssuesConfig, arguments, arguments.config))


def _command_export(arguments) -> int:
    from catdog.export import ExportConfig, run_export

    run_export(config_from_arguments(ExportConfig, arguments, arguments.config))
    return 0


def _command_serve(arguments) -> int:
    from catdog.model_files import model_file_for
    from catdog.serve.app import ServeConfig, run_server

    config = config_from_arguments(ServeConfig, arguments, arguments.config)
    # The server (and each of its --workers) runs one exported file: a run or the built-in model is exported first.
    config.model, config.run = str(model_file_for(config.model, config.run, config.cache_dir or None)), ""
    run_server(config)
    return 0


def _command_tune(arguments) -> int:
    from catdog.tune import TuneConfig, run_tuning

    run_tuning(config_from_arguments(TuneConfig, arguments, arguments.config))
    return 0


def _command_explain(arguments) -> int:
    from catdog.explain import ExplainConfig, run_explain
    from catdog.model_files import load_predictor
    from catdog.predict import collect_or_fail

    config = config_from_arguments(ExplainConfig, arguments, arguments.config)
    collect_or_fail(config.paths)  # nothing to explain: say so before loading (or exporting) a model
    return run_explain(config, load_predictor(config.model, config.run, "onnxruntime", "cpu", config.cache_dir or None))


def _command_report(arguments) -> int:
    from catdog.report import ReportConfig, build_report

    build_report(config_from_arguments(ReportConfig, arguments, arguments.config))
    return 0


def _command_models(arguments) -> int:
    from catdog.models import model_listing

    print(model_listing())
    return 0


def _config_class(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


TRAIN, TUNE = ("train",), ("train", "tune")
COMMANDS: dict[str, tuple[str, str | None, Callable, tuple[str, ...], tuple[str, ...]]] = {
    # name: (help, "module:ConfigClass", handler, positional fields, extras it needs beyond the runtime)
    "train": ("train a classifier", "catdog.train:TrainConfig", _command_train, (), TRAIN),
    "evaluate": ("metrics and plots for a trained run", "catdog.evaluate:EvaluateConfig", _command_evaluate, (), TRAIN),
    "predict": ("classify image files or folders into a CSV", "catdog.predict:PredictConfig", _command_predict, ("paths",), ()),
    "export": ("export a run (or --builtin) to one deployable ONNX file", "catdog.export:ExportConfig", _command_export, (), TRAIN),
    "serve": ("web service and page for an exported model", "catdog.serve.app:ServeConfig", _command_serve, (), ()),
    "tune": ("hyper-parameter search with Optuna", "catdog.tune:TuneConfig", _command_tune, (), TUNE),
    "explain": ("Grad-CAM: the photo with the predicted class's heatmap over it", "catdog.explain:ExplainConfig", _command_explain, ("paths",), ()),
    "report": ("one self-contained HTML report of a run", "catdog.report:ReportConfig", _command_report, (), TRAIN),
    "models": ("list the available models", None, _command_models, (), TRAIN),
}
DATA_COMMANDS = {
    "inspect": ("class counts, sizes, unreadable files, a sample grid", "catdog.inspect_data:InspectConfig", _command_inspect, ("data",), TRAIN),
    "audit": ("decode every file: corrupt, odd modes, duplicates", "catdog.audit:AuditConfig", _command_audit, ("data",), TRAIN),
    "issues": ("likely label errors: photos whose label out-of-fold heads least believe", "catdog.label_issues:LabelIssuesConfig", _command_issues, ("data",), TRAIN),
}


def _add_commands(subparsers, commands, wanted: str | None) -> None:
    """One sub-command per entry; its options (which import its module) only for `wanted` (None: all of them
    whose extras are installed; the others say which extra they need)."""
    for name, (help_text, config_path, handler, positional, extras) in commands.items():
        available = all(installed(extra) for extra in extras)
        shown = help_text if available else f"{help_text} (needs catdog[{','.join(extras)}])"
        parser = subparsers.add_parser(name, help=shown, description=shown)
        parser.set_defaults(handler=handler)
        if config_path and wanted in (None, name) and available:
            config_class = _config_class(*config_path.split(":"))
            parser.add_argument("--config", help="YAML or JSON file of options (command-line options win)")
            add_config_arguments(parser, config_class, positional)


def _requested_command(argv: Sequence[str]) -> list[str]:
    """The command words at the front of `argv` (["predict"], ["data", "audit"]); empty when there are none."""
    words = []
    for token in argv:
        if token.startswith("-") or len(words) == (2 if words[:1] == ["data"] else 1):
            break
        words.append(token)
    return words


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser. Given `argv`, only the invoked command's options are built: each command's options come from its
    config class, and importing every command's module would import training, tuning and serving code (torch,
    Optuna, FastAPI) for every command; `catdog predict` on ONNX Runtime needs none of them."""
    words = _requested_command(argv) if argv is not None else []
    wanted = words[0] if words else None
    parser = argparse.ArgumentParser(prog="catdog", description="Train, evaluate, export and serve image classifiers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_commands(subparsers, COMMANDS, wanted)
    data_parser = subparsers.add_parser("data", help="look at a data set")
    data_subparsers = data_parser.add_subparsers(dest="data_command", required=True)
    _add_commands(data_subparsers, DATA_COMMANDS, words[1] if wanted == "data" and len(words) > 1 else None)
    return parser


def _require_the_command_extras(argv: Sequence[str]) -> None:
    """MissingExtra when the invoked command needs an extra that is not installed (before its options, which come
    from its module, are built)."""
    words = _requested_command(argv)
    entry = COMMANDS.get(words[0]) if words else None
    if words[:1] == ["data"]:
        entry = DATA_COMMANDS.get(words[1]) if len(words) > 1 else None
    if entry and entry[4]:
        require_extra(*entry[4], what=f"catdog {' '.join(words)}")


def _failure_types() -> tuple[type[BaseException], ...]:
    """The errors that mean "the job failed" (exit 1): the runtime's, and those of training-layer modules the
    command has imported (never imported here: they need torch and Optuna, which a runtime install lacks)."""
    from catdog.data import DataError
    from catdog.images import ImageLoadError
    from catdog.runs import RunError

    failures: list[type[BaseException]] = [DataError, RunError, ImageLoadError, FileNotFoundError]
    for module, name in (("catdog.models", "PretrainedWeightsUnavailable"), ("catdog.tune", "StudyStorageError")):
        if module in sys.modules:
            failures.append(getattr(sys.modules[module], name))
    return tuple(failures)


def main(argv: Sequence[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in logs
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        # `torchrun ... -m catdog -- predict --run RUN`: the `--` keeps torchrun from reading --run as an
        # abbreviation of its own --run-path; depending on the Python version it reaches catdog too.
        argv = argv[1:]
    try:
        _require_the_command_extras(argv)
        arguments = build_parser(argv).parse_args(argv)
        return arguments.handler(arguments)
    except MissingExtra as error:  # one line naming the extra, no traceback
        print(f"catdog: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("catdog: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if isinstance(error, _failure_types()):
            print(f"catdog: error: {error}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(error, ValueError):
            print(f"catdog: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        raise
    finally:
        distributed = sys.modules.get("catdog.distributed")
        if distributed is not None:  # imported only by a command that may have joined torchrun's process group
            distributed.shutdown()  # leave it (torch warns at exit when a process never did)


if __name__ == "__main__":
    sys.exit(main())
