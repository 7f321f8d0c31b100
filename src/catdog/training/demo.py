"""`make demo`: inspect -> train -> evaluate -> export -> predict on one data set, the whole tutorial in one go.

DATA is a Kaggle-style folder holding `train/` (and optionally the unlabelled `test1/`), or any labelled layout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from catdog.training.evaluate import EvaluateConfig, evaluate_run
from catdog.training.export import ExportConfig, run_export
from catdog.training.inspect_data import InspectConfig, inspect_data
from catdog.runtime.predict import PredictConfig, run_predict
from catdog.runtime.model_file import load_model_file
from catdog.training.train import TrainConfig, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--preset", default="default")
    arguments = parser.parse_args(argv)
    data, run = Path(arguments.data), Path(arguments.run)
    labelled = data / "train" if (data / "train").is_dir() else data
    unlabelled = data / "test1" if (data / "test1").is_dir() else None
    started = time.perf_counter()
    if (run / "last_checkpoint.safetensors").exists():
        run = run.with_name(f"{run.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"== 1/4 inspect {labelled}")
    inspect_data(InspectConfig(data=str(labelled), out=str(run / "inspect")))
    print(f"\n== 2/4 train -> {run}")
    train(TrainConfig(data=str(labelled), out=str(run), preset=arguments.preset, progress=sys.stderr.isatty()))
    print("\n== 3/4 evaluate (validation split)")
    metrics = evaluate_run(EvaluateConfig(run=str(run)))
    print("\n== 4/4 export the deployable file, predict with it")
    model_file = run_export(ExportConfig(run=str(run)))  # <run>/model.onnx: all that predict and serve need
    if unlabelled:
        run_predict(PredictConfig(paths=[str(unlabelled)], model=str(model_file), output=str(run / "test1_predictions.csv"),
                                  submission=str(run / "submission.csv"), progress=False), load_model_file(model_file))
    else:
        print("no test1/ folder next to train/: nothing to predict")
    print(f"\nvalidation accuracy: {metrics['accuracy']:.4f} (log loss {metrics['log_loss']:.4f}) "
          f"in {time.perf_counter() - started:.0f} s; results in {run}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
