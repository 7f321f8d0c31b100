"""GPU readiness: one script to run on a lent GPU machine, printing one table.

    python benchmarks/gpu_benchmark.py                 # on a GPU machine, with ../shared/data/dogs-vs-cats
    python benchmarks/gpu_benchmark.py --smoke         # a tiny CPU setting (seconds), run by `make test`

Rows:
1. fine-tuning images/s on one device: fp32 against bf16 autocast + channels_last (synthetic batches, so the model
   is measured, not the JPEG decoder), with the speed-up;
2. DDP scaling: the same training step under `torchrun --nproc_per_node K` for K = 1, 2, 4, ... up to the GPUs
   present (NCCL), images/s in all and the efficiency against K times one process;
3. accuracy reached on the shared photos within a fixed time: `torchrun ... -m catdog -- train --strategy
   finetune --time-budget M` over every GPU, then its validation accuracy;
4. head-strategy feature extraction images/s (PyTorch backbone on the device, cold cache) from the JPEGs;
5. predict images/s with the run of row 3 (PyTorch backend on the device).
--smoke runs every row on a CPU with gloo, a tiny network and a few generated images: it checks the script, not
the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, machine_description  # noqa: E402


def synthetic_training_speed(model_name: str, image_size: int, batch_size: int, steps: int, device: torch.device,
                             bf16_channels_last: bool, distributed: bool = False) -> float:
    """Images per second of forward + backward + AdamW steps on random batches (after two warm-up steps)."""
    from catdog.training.models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, 2, pretrained=False).to(device)
    if bf16_channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained = model
    if distributed:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if bf16_channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch_size,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_channels_last):
            loss = torch.nn.functional.cross_entropy(trained(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch_size * steps / (time.perf_counter() - started)


def ddp_worker(arguments) -> None:
    """One torchrun process of row 2: rank 0 prints the images/s of all processes together as JSON."""
    from catdog.training.distributed import all_gather_objects, init_from_environment, is_distributed, is_main_process, shutdown

    device = init_from_environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    speed = synthetic_training_speed(arguments.model, arguments.image_size, arguments.batch_size, arguments.steps,
                                     device, device.type == "cuda", distributed=is_distributed())
    speeds = all_gather_objects(speed)
    if is_main_process():
        print(json.dumps({"images_per_second": sum(speeds)}), flush=True)
    shutdown()


def torchrun(processes: int, arguments: list[str], environment: dict | None = None) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(environment or {})})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def make_smoke_photos(folder: Path) -> Path:
    """A few generated photos in Kaggle's layout (cat.N.jpg, dog.N.jpg): red-ish cats, green-ish dogs."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        for index in range(8):
            pixels = np.zeros((48, 64, 3))
            pixels[..., label] = 170
            pixels = np.clip(pixels + generator.normal(0, 40, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}.{index}.jpg")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU setting: checks the script in seconds")
    parser.add_argument("--data", default=str(SHARED_DATA / "train"), help="labelled photos for rows 3-5")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128, help="per GPU, rows 1-2")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps, rows 1-2")
    parser.add_argument("--minutes", type=float, default=5.0, help="time budget of row 3")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.smoke:
        arguments.model, arguments.image_size, arguments.batch_size, arguments.steps = "simple_cnn", 32, 8, 5
        arguments.minutes = 0.1
    if arguments.ddp_worker:
        ddp_worker(arguments)
        return 0

    cuda = torch.cuda.is_available()
    if not cuda and not arguments.smoke:
        sys.exit("no CUDA device: run this on a GPU machine, or pass --smoke for the tiny CPU setting")
    device = torch.device("cuda" if cuda else "cpu")
    gpus = torch.cuda.device_count() if cuda else 2  # the smoke setting scales over two CPU processes
    rows: list[tuple[str, str, str]] = []
    print(f"machine: {machine_description()}" + (f", {gpus} x {torch.cuda.get_device_name(0)}" if cuda else ""), flush=True)

    # 1. one device, fp32 against bf16 + channels_last
    size, batch = arguments.image_size, arguments.batch_size
    fp32 = synthetic_training_speed(arguments.model, size, batch, arguments.steps, device, False)
    rows.append(("finetune, 1 device, fp32", f"{arguments.model} {size} px batch {batch}", f"{fp32:.1f} img/s"))
    single = fp32
    if cuda:
        single = synthetic_training_speed(arguments.model, size, batch, arguments.steps, device, True)
        rows.append(("finetune, 1 device, bf16 + channels_last", f"{arguments.model} {size} px batch {batch}",
                     f"{single:.1f} img/s ({single / fp32:.2f}x fp32)"))

    # 2. DDP scaling over the GPUs present, against the one-device figure of the same setting
    counts = [k for k in (1, 2, 4, 8, 16) if k <= gpus]
    worker = [str(Path(__file__).resolve()), "--ddp-worker", "--model", arguments.model, "--image-size", str(size),
              "--batch-size", str(batch), "--steps", str(arguments.steps)]
    for count in counts[1:]:
        output = torchrun(count, worker, {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")})
        speed = json.loads([line for line in output.splitlines() if line.startswith('{"images_per_second"')][-1])["images_per_second"]
        rows.append((f"DDP, {count} processes", f"{'nccl' if cuda else 'gloo (CPU)'}, batch {batch} each",
                     f"{speed:.1f} img/s, efficiency {speed / (count * single):.2f}"))

    # 3-5 on photos: the shared ones on a GPU machine, a few generated ones in the smoke setting
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = make_smoke_photos(scratch / "photos") if arguments.smoke else Path(arguments.data)
        run, cache = scratch / "run", scratch / "cache"
        train_options = ["--data", str(data), "--out", str(run), "--model", arguments.model, "--strategy", "finetune",
                         "--time-budget", str(arguments.minutes), "--epochs", "1000", "--early-stopping", "0",
                         "--no-progress", "--cache-dir", str(cache)]
        if arguments.smoke:
            train_options += ["--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--epochs", "2"]
        else:
            train_options += ["--batch-size", str(64 * gpus)]
        started = time.perf_counter()
        torchrun(counts[-1], ["-m", "catdog", "--", "train", *train_options], {"PYTHONPATH": str(ROOT / "src")})
        seconds = time.perf_counter() - started
        meta = json.loads((run / "meta.json").read_text())
        epochs = len((run / "history.csv").read_text().splitlines()) - 1
        rows.append((f"accuracy in {arguments.minutes:g} min, {counts[-1]} process(es)", f"{epochs} epoch(s), {seconds:.0f} s in all",
                     f"val accuracy {meta['metrics']['accuracy']:.4f}"))

        from dataclasses import replace

        from catdog.runtime.data import discover
        from catdog.training.features import extract_features
        from catdog.training.models import create_model, get_model_spec
        from catdog.training.backends import load_torch_predictor

        paths = discover(str(data)).paths
        head_model = "efficientnet_lite0"
        preprocess = get_model_spec(head_model).preprocess
        if arguments.smoke:
            preprocess = replace(preprocess, input_size=64)
        features = extract_features(paths, lambda: create_model(head_model, 2, pretrained=not arguments.smoke).backbone,
                                    head_model, preprocess, ("original",), device=device, backend="torch",
                                    cache_dir=cache, batch_size=8 if arguments.smoke else 256,
                                    num_workers=0 if arguments.smoke else 8)
        rows.append(("head extraction, 1 device", f"{head_model} {preprocess.input_size} px, {len(paths)} JPEGs",
                     f"{len(paths) / features.seconds:.1f} img/s"))

        predictor = load_torch_predictor(str(run), device)
        predictor.predict_files(paths[:64], batch_size=32, decode_threads=1)  # warm-up
        outcome = predictor.predict_files(paths, batch_size=8 if arguments.smoke else 256,
                                          decode_threads=1 if arguments.smoke else 8)
        rows.append(("predict, 1 device", f"run of row 3, {len(paths)} JPEGs", f"{len(paths) / outcome.seconds:.1f} img/s"))

    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    print()
    print(f"| {'measure':<{widths[0]}} | {'setting':<{widths[1]}} | {'result':<{widths[2]}} |")
    print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * (widths[2] + 2)}|")
    for row in rows:
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
