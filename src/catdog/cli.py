"""The `catdog` command: a thin layer that turns options into the library's config dataclasses.

Exit codes: 0 success; 1 the job failed (bad data, bad run directory, training error); 2 bad command-line usage;
3 `predict` (or `explain`) wrote its output but some input files could not be read (listed on stderr, and for predict in the errors CSV).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from catdog.runtime.options import add_config_arguments, config_from_arguments
from catdog.runtime.extras import MissingExtra, installed, require_extra

EXIT_FAILED = 1
EXIT_USAGE = 2


# Each handler gets its command's validated config and returns the exit code. It imports the command's
# implementation only now: building the parser (and --help) imports the config classes alone.

def _command_train(config) -> int:
    from catdog.training.train import train

    train(config)
    return 0


def _command_evaluate(config) -> int:
    from catdog.training.evaluate import evaluate_run

    evaluate_run(config)
    return 0


def _command_predict(config) -> int:
    from catdog.model_files import open_model
    from catdog.runtime.predict import collect_or_fail, launched_processes, run_predict
    from catdog.runtime.runs import check_not_pickle

    check_not_pickle(config.model or config.run)  # the more fundamental mistake is named first
    collect_or_fail(config.paths)  # nothing to predict: say so before loading (or exporting) a model
    if launched_processes() == 1:
        return run_predict(config, open_model(config.model, config.run, config.backend, config.device,
                                              config.cache_dir or None, ood_keep=config.ood_keep))
    # Under torchrun the ranks share the files (torch.distributed); each runs the model on its own device.
    require_extra("train", what="predicting under torchrun")
    from catdog.training.backends import join_ranks, run_predict_across_ranks  # the training layer, installed (checked above)
    from catdog.training.distributed import main_process_first

    device = join_ranks(config.device)
    with main_process_first():  # rank 0 exports the model file once; the others then find it in the cache
        predictor = open_model(config.model, config.run, config.backend, device, config.cache_dir or None,
                               ood_keep=config.ood_keep)
    return run_predict_across_ranks(config, predictor)


def _command_inspect(config) -> int:
    from catdog.training.inspect_data import inspect_data

    inspect_data(config)
    return 0


def _command_audit(config) -> int:
    from catdog.training.audit import run_audit

    return run_audit(config)


def _command_issues(config) -> int:
    from catdog.training.label_issues import run_label_issues

    return run_label_issues(config)


def _command_export(config) -> int:
    from catdog.training.export import run_export

    run_export(config)
    return 0


def _command_serve(config) -> int:
    from catdog.model_files import open_model
    from catdog.serve.app import run_server

    # The server (and each of its --workers) runs one exported file: a run or the built-in model is exported first.
    predictor = open_model(config.model, config.run, "onnxruntime", config.device, config.cache_dir or None,
                           config.inference_threads, config.ood_keep)
    config.model, config.run = predictor.source, ""
    run_server(config, predictor)
    return 0


def _command_tune(config) -> int:
    from catdog.training.tune import run_tuning

    run_tuning(config)
    return 0


def _command_explain(config) -> int:
    from catdog.model_files import open_model
    from catdog.runtime.explain import run_explain
    from catdog.runtime.predict import collect_or_fail

    collect_or_fail(config.paths)  # nothing to explain: say so before loading (or exporting) a model
    return run_explain(config, open_model(config.model, config.run, "onnxruntime", "cpu", config.cache_dir or None))


def _command_report(config) -> int:
    from catdog.training.report import build_report

    build_report(config)
    return 0


def _command_models(config) -> int:
    from catdog.training.models import model_listing

    print(model_listing())
    return 0


def _config_class(config_path: str):
    import importlib

    module, name = config_path.split(":")
    return getattr(importlib.import_module(module), name)


TRAIN, TUNE = ("train",), ("train", "tune")
COMMANDS: dict[str, tuple[str, str | None, Callable, tuple[str, ...], tuple[str, ...]]] = {
    # name: (help, "module:ConfigClass", handler, positional fields, extras it needs beyond the runtime)
    "train": ("train a classifier", "catdog.training.config:TrainConfig", _command_train, (), TRAIN),
    "evaluate": ("metrics and plots for a trained run", "catdog.training.config:EvaluateConfig", _command_evaluate, (), TRAIN),
    "predict": ("classify image files or folders into a CSV", "catdog.runtime.config:PredictConfig", _command_predict, ("paths",), ()),
    "export": ("export a run (or --builtin) to one deployable ONNX file", "catdog.training.config:ExportConfig", _command_export, (), TRAIN),
    "serve": ("web service and page for an exported model", "catdog.serve.config:ServeConfig", _command_serve, (), ()),
    "tune": ("hyper-parameter search with Optuna", "catdog.training.config:TuneConfig", _command_tune, (), TUNE),
    "explain": ("Grad-CAM: the photo with the predicted class's heatmap over it", "catdog.runtime.config:ExplainConfig", _command_explain, ("paths",), ()),
    "report": ("one self-contained HTML report of a run", "catdog.training.config:ReportConfig", _command_report, (), TRAIN),
    "models": ("list the available models", None, _command_models, (), TRAIN),
}
DATA_COMMANDS = {
    "inspect": ("class counts, sizes, unreadable files, a sample grid", "catdog.training.config:InspectConfig", _command_inspect, ("data",), TRAIN),
    "audit": ("decode every file: corrupt, odd modes, duplicates", "catdog.training.config:AuditConfig", _command_audit, ("data",), TRAIN),
    "issues": ("likely label errors: photos whose label out-of-fold heads least believe", "catdog.training.config:LabelIssuesConfig", _command_issues, ("data",), TRAIN),
}


ALL_COMMANDS = "*"  # `wanted` for a parser with every command's options (tests, documentation)


def _add_commands(subparsers, commands, wanted: str | None) -> None:
    """One sub-command per entry; its options (from its config class) only for `wanted` (ALL_COMMANDS: every
    command whose extras are installed; None: none, as for `catdog --help`, which lists the commands alone)."""
    for name, (help_text, config_path, handler, positional, extras) in commands.items():
        available = all(installed(extra) for extra in extras)
        shown = help_text if available else f"{help_text} (needs catdog[{','.join(extras)}])"
        parser = subparsers.add_parser(name, help=shown, description=shown)
        parser.set_defaults(handler=handler, config_path=config_path)
        if config_path and wanted in (ALL_COMMANDS, name) and available:
            config_class = _config_class(config_path)
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
    """The parser. Given `argv`, only the invoked command's options are built (none for `catdog --help`): they come
    from its config class, which imports no implementation, torch, Optuna or FastAPI. Without `argv`, every
    command's options."""
    words = _requested_command(argv) if argv is not None else []
    wanted = words[0] if words else (None if argv is not None else ALL_COMMANDS)
    parser = argparse.ArgumentParser(prog="catdog", description="Train, evaluate, export and serve image classifiers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_commands(subparsers, COMMANDS, wanted)
    data_parser = subparsers.add_parser("data", help="look at a data set")
    data_subparsers = data_parser.add_subparsers(dest="data_command", required=True)
    data_wanted = words[1] if wanted == "data" and len(words) > 1 else ALL_COMMANDS if wanted == ALL_COMMANDS else None
    _add_commands(data_subparsers, DATA_COMMANDS, data_wanted)
    return parser


def _require_the_command_extras(argv: Sequence[str]) -> None:
    """MissingExtra when the invoked command needs an extra that is not installed (before its options are built)."""
    words = _requested_command(argv)
    entry = COMMANDS.get(words[0]) if words else None
    if words[:1] == ["data"]:
        entry = DATA_COMMANDS.get(words[1]) if len(words) > 1 else None
    if entry and entry[4]:
        require_extra(*entry[4], what=f"catdog {' '.join(words)}")


def _failure_types() -> tuple[type[BaseException], ...]:
    """The errors that mean "the job failed" (exit 1): the runtime's, and those of training-layer modules the
    command has imported (never imported here: they need torch and Optuna, which a runtime install lacks)."""
    from catdog.runtime.data import DataError
    from catdog.runtime.images import ImageLoadError
    from catdog.runtime.runs import RunError

    failures: list[type[BaseException]] = [DataError, RunError, ImageLoadError, FileNotFoundError]
    for module, name in (("catdog.training.models", "PretrainedWeightsUnavailable"), ("catdog.training.tune", "StudyStorageError")):
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
        if arguments.config_path is None:  # `catdog models`
            return arguments.handler(None)
        config = config_from_arguments(_config_class(arguments.config_path), arguments, arguments.config)
        return arguments.handler(config)
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
        distributed = sys.modules.get("catdog.training.distributed")
        if distributed is not None:  # imported only by a command that may have joined torchrun's process group
            distributed.shutdown()  # leave it (torch warns at exit when a process never did)


if __name__ == "__main__":
    sys.exit(main())
