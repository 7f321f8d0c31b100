"""`catdog serve`'s options (`ServeConfig`), documented field by field. Imports no FastAPI, so `catdog serve --help`
stays fast."""

from __future__ import annotations

import os
from dataclasses import dataclass

from catdog.runtime.images import DEFAULT_MAX_PIXELS
from catdog.runtime.options import option

API_KEY_ENVIRONMENT_VARIABLE = "CATDOG_API_KEY"



@dataclass
class ServeConfig:
    model: str = option("", "exported model file (model.onnx from `catdog export`): all that serving needs", metavar="FILE")
    run: str = option("", "run directory (its model.onnx, or exported on the fly with catdog[train]); neither --model nor --run: the built-in zero-training cat/dog model")
    cache_dir: str = option("", "where models exported on the fly are kept; empty: $CATDOG_CACHE or ~/.cache/catdog")
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = option(8000, "port")
    device: str = option("auto", "ONNX Runtime's device: auto (CUDA when this ONNX Runtime has it, else the CPU), cpu or cuda")
    max_batch_size: int = option(0, "most images in one inference batch; 0: the size the model runs fastest at on this machine (measured at the first start, then kept in the cache folder)")
    max_wait_ms: float = option(10.0, "longest wait for more images before running a batch")
    max_queue: int = option(128, "images waiting for inference before new requests get 503")
    max_upload_mb: float = option(10.0, "largest accepted upload per image, in MB (larger: 413)")
    max_batch_files: int = option(32, "most files in one /predict/batch request")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "largest accepted image in pixels (larger: 413)")
    decode_threads: int = option(2, "threads decoding uploads")
    tta: bool | None = option(None, "test-time augmentation (average over the image and its mirror image); default: as the run was validated")
    check_orientation: bool = option(False, "off by default: read a photo that looks turned a quarter (no EXIF) the way up the network reads best. Measured: sideways photos 92.5% -> 94.9% right, but on original-size Kaggle photos it turned an upright photo into a confident wrong answer (dog 0.98 -> cat 0.9999); see the README (runs trained by catdog >= 0.5)")
    ood_keep: float | None = option(None, "say \"neither\" above the out-of-distribution score that keeps this share of the run's validation photos; default: the run's threshold (99%)")
    workers: int = option(1, "server processes on the one port, each with its own model (uvicorn's workers); "
                             "on a bigger machine: cores / threads per worker")
    threads: int = option(0, "inference threads per worker; 0: all cores with one worker, else the cores shared out")
    api_key: str = option("", f"require 'Authorization: Bearer <key>' on every endpoint but /health, /ready and "
                              f"the page; default: ${API_KEY_ENVIRONMENT_VARIABLE} (safer: not shown by ps)")

    def __post_init__(self):
        if self.model and self.run:
            raise ValueError("give --model or --run, not both")
        if not 0 < self.port < 65536:
            raise ValueError("--port must be in 1..65535")
        if self.max_batch_size < 0 or self.max_queue < 1 or self.max_batch_files < 1 or self.decode_threads < 1:
            raise ValueError("queue, batch files and decode threads must be at least 1, and the batch size not negative")
        if self.workers < 1 or self.threads < 0:
            raise ValueError("--workers must be at least 1 and --threads not negative")
        self.api_key = self.api_key or os.environ.get(API_KEY_ENVIRONMENT_VARIABLE, "")
        if self.api_key != self.api_key.strip() or any(not 0x21 <= ord(c) <= 0x7E for c in self.api_key):
            raise ValueError(f"--api-key / {API_KEY_ENVIRONMENT_VARIABLE} must be printable ASCII without spaces "
                             "(it travels in an HTTP header)")
        if self.max_upload_mb <= 0 or self.max_wait_ms < 0:
            raise ValueError("--max-upload-mb must be positive and --max-wait-ms not negative")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def inference_threads(self) -> int | None:
        """Threads for one worker's model; None: one per physical core (`inference.session_options`)."""
        if self.threads:
            return self.threads
        if self.workers == 1:
            return None
        return max(1, len(os.sched_getaffinity(0)) // self.workers)
