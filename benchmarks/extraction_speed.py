"""Feature extraction against the network's own best forward rate, on the machine at hand (issue 24).

    python benchmarks/extraction_speed.py [--photos 600] [--model efficientnet_lite2] [--size 300]
        [--batch-sizes 4,8,16,64] [--workers 1]

First the backbone alone, as ONNX Runtime runs it for extraction, on random images at each batch size (the
network's best rate is the ceiling); then `extract_features` end to end (decode, preprocess, both views) on the
shared photos with a fresh cache, at the batch size measured for this machine and at each --batch-sizes, in one
invocation. Prints views/s and the share of the network's best rate each reaches.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import machine_description, require_shared_data

from catdog.runtime.batch_size import CPU_CANDIDATES, measure_rates
from catdog.training.features import backbone_batch_size, extract_features, make_backbone_runner
from catdog.training.models import create_model, get_model_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=600)
    parser.add_argument("--model", default="efficientnet_lite2")
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--batch-sizes", default="4,8,16,64", help="end-to-end runs at these sizes besides the measured one")
    parser.add_argument("--workers", type=int, default=1, help="decoder processes (DataLoader workers)")
    arguments = parser.parse_args()

    from dataclasses import replace

    import torch

    preprocess = replace(get_model_spec(arguments.model).preprocess, input_size=arguments.size)
    paths = sorted((require_shared_data() / "train").glob("*.jpg"))[: arguments.photos]
    print(machine_description())
    backbone = lambda: create_model(arguments.model, 2, pretrained=True, freeze_backbone=True).backbone  # noqa: E731
    with tempfile.TemporaryDirectory() as scratch:
        onnx_cache = Path(scratch) / "onnx-cache"
        runner = make_backbone_runner(backbone, arguments.model, preprocess, torch.device("cpu"), "onnxruntime", onnx_cache)
        rates = measure_rates(lambda batch: runner(torch.from_numpy(batch)), (3, arguments.size, arguments.size),
                              CPU_CANDIDATES, seconds=1.0)
        best = max(rates.values())
        print(f"network alone ({arguments.model} at {arguments.size} px, {runner.threads} ONNX Runtime threads), images/s: "
              + ", ".join(f"{size}: {rate:.1f}" for size, rate in rates.items()) + f"; best {best:.1f}", flush=True)
        measured = backbone_batch_size(runner, arguments.model, preprocess, torch.device("cpu"), 10**6,
                                       cache_dir=onnx_cache).batch_size
        sizes = [measured] + [int(size) for size in arguments.batch_sizes.split(",") if int(size) != measured]
        for size in sizes:
            cache = Path(scratch) / f"features-{size}"
            (cache / "onnx").mkdir(parents=True)
            for exported in (onnx_cache / "onnx").glob("*.onnx"):  # the same exported backbone, not exported again
                (cache / "onnx" / exported.name).symlink_to(exported)
            # This machine's speed drifts by 10-15% over minutes: the network alone is timed again right before
            # each extraction, at its best size, and the extraction is compared with that.
            best_size = max(rates, key=rates.get)
            now = measure_rates(lambda batch: runner(torch.from_numpy(batch)), (3, arguments.size, arguments.size),
                                (best_size,), seconds=3.0)[best_size]
            started = time.perf_counter()
            result = extract_features(paths, backbone, arguments.model, preprocess, ("original", "flipped"),
                                      cache_dir=cache, batch_size=size, num_workers=arguments.workers)
            seconds = time.perf_counter() - started
            views = 2 * result.computed / seconds
            label = "measured for this machine" if size == measured else "forced"
            print(f"extract_features, batch {size:>3} ({label}): {len(paths)} photos x 2 views in {seconds:.1f} s = "
                  f"{views:.1f} views/s; the network alone just before, at batch {best_size}: {now:.1f}/s; "
                  f"extraction at {views / now:.0%} of it ({views / best:.0%} of the first measurement's best)", flush=True)


if __name__ == "__main__":
    main()
