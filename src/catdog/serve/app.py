"""The FastAPI application: configuration, lifespan (model loaded and warmed once, at start-up), error handling
and the uvicorn server with graceful shutdown, in one process or several (`--workers`).

Every error is JSON `{"error": ..., "detail": ...}` (`schemas.ErrorBody`) with a 4xx status that says what was
wrong; an unexpected exception still answers JSON, and is logged, rather than killing the process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import numpy as np

import catdog
from catdog.config import option
from catdog.images import DEFAULT_MAX_PIXELS
from catdog.predict import Predictor, load_model_file
from catdog.serve import routes_explain, routes_health, routes_predict
from catdog.serve.access import API_KEY_ENVIRONMENT_VARIABLE, AccessMiddleware, document_api_key, is_loopback
from catdog.serve.batching import MicroBatcher
from catdog.serve.observability import ServiceMetrics
from catdog.serve.schemas import error_response

logger = logging.getLogger("catdog.serve")
# `--workers N` starts N processes that each build the app from this variable (the config as JSON).
CONFIG_ENVIRONMENT_VARIABLE = "CATDOG_SERVE_CONFIG"


@dataclass
class ServeConfig:
    model: str = option("", "exported model file (model.onnx from `catdog export`): all that serving needs", metavar="FILE")
    run: str = option("", "run directory (its model.onnx, or exported on the fly with catdog[train]); neither --model nor --run: the built-in zero-training cat/dog model")
    cache_dir: str = option("", "where models exported on the fly are kept; empty: $CATDOG_CACHE or ~/.cache/catdog")
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = option(8000, "port")
    device: str = option("auto", "ONNX Runtime's device: auto (CUDA when this ONNX Runtime has it, else the CPU), cpu or cuda")
    max_batch_size: int = option(16, "most images in one inference batch")
    max_wait_ms: float = option(10.0, "longest wait for more images before running a batch")
    max_queue: int = option(128, "images waiting for inference before new requests get 503")
    max_upload_mb: float = option(10.0, "largest accepted upload per image, in MB (larger: 413)")
    max_batch_files: int = option(32, "most files in one /predict/batch request")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "largest accepted image in pixels (larger: 413)")
    decode_threads: int = option(2, "threads decoding uploads")
    tta: bool | None = option(None, "test-time augmentation (average over the image and its mirror image); default: as the run was validated")
    check_orientation: bool = option(True, "read a photo that looks turned a quarter (no EXIF) the way up the network reads best; checks about 2% of ordinary photos (runs trained by catdog >= 0.5)")
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
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_batch_files < 1 or self.decode_threads < 1:
            raise ValueError("batch size, queue, batch files and decode threads must be at least 1")
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


@dataclass
class ServiceState:
    """What the routes need, created in the lifespan and kept on `app.state.service`."""

    config: ServeConfig
    predictor: Predictor
    batcher: MicroBatcher
    decoder: ThreadPoolExecutor
    metrics: ServiceMetrics
    ready: bool = False


def create_app(config: ServeConfig, predictor: Predictor | None = None) -> FastAPI:
    """The app. `predictor` may be given (tests, the Python API); otherwise the lifespan loads `config.model`, an
    exported file (the command line exports a run or the built-in model first: `model_files.model_file_for`)."""
    if predictor is None and not config.model:
        raise ValueError("serve needs an exported model file: --model FILE (`catdog export` writes one)")
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = predictor or await asyncio.to_thread(load_model_file, config.model, config.inference_threads, config.device,
                                                      config.ood_keep)

        def predict_batch(images: np.ndarray) -> list[tuple[np.ndarray, float | None]]:
            """(probabilities, out-of-distribution score or None) per image."""
            probabilities, ood_scores = loaded.predict_batch(images, tta=config.tta, check_orientation=config.check_orientation)
            scores = [None] * len(probabilities) if ood_scores is None else [float(score) for score in ood_scores]
            return list(zip(probabilities, scores))

        batcher = MicroBatcher(predict_batch, config.max_batch_size, config.max_wait_ms, config.max_queue, metrics)
        state = ServiceState(config, loaded, batcher, ThreadPoolExecutor(config.decode_threads, thread_name_prefix="catdog-decode"), metrics)
        app.state.service = state
        batcher.start()
        size = loaded.preprocess.input_size
        await batcher.submit(np.zeros((3, size, size), dtype=np.float32))  # warm-up: first-call allocations happen before /ready
        state.ready = True
        logger.info("catdog serve ready: %s", loaded.describe())
        yield
        state.ready = False
        await batcher.stop()
        state.decoder.shutdown(wait=False)

    # Operation ids are the route functions' names (predict, predict_batch, health...): the names a generated client's
    # functions get, instead of FastAPI's default "predict_predict_post".
    app = FastAPI(title="catdog", description="Image classification service", version=catdog.__version__, lifespan=lifespan,
                  generate_unique_id_function=lambda route: route.name)
    app.include_router(routes_predict.router)
    app.include_router(routes_health.router)
    app.include_router(routes_explain.router)
    if config.api_key:
        plain_openapi = app.openapi

        def openapi_with_api_key() -> dict:
            if app.openapi_schema is None:
                app.openapi_schema = document_api_key(plain_openapi())
            return app.openapi_schema

        app.openapi = openapi_with_api_key

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return error_response(422, "invalid request", "; ".join(str(e.get("msg", e)) for e in error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        detail = error.detail if isinstance(error.detail, str) else str(error.detail)
        return error_response(error.status_code, detail.lower() if len(detail) < 40 else "request failed", detail,
                              getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception):
        logger.exception("unexpected error on %s (request_id=%s)", request.url.path, getattr(request.state, "request_id", "-"))
        return error_response(500, "internal error", type(error).__name__)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        import time

        started = time.perf_counter()
        response = await call_next(request)
        route = request.url.path if request.url.path in ("/predict", "/predict/batch", "/explain", "/", "/health", "/ready") else "other"
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        return response

    # Added last, so outermost: the 401 is answered before any other work, and every answer gets its request id.
    app.add_middleware(AccessMiddleware, api_key=config.api_key)
    return app


def create_app_from_env() -> FastAPI:
    """The app of one `--workers` process: uvicorn imports this factory in each worker it starts."""
    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENVIRONMENT_VARIABLE])))


def exposure_warning(config: ServeConfig) -> str | None:
    if is_loopback(config.host) or config.api_key:
        return None
    return (f"catdog serve: warning: binding to {config.host} without an API key: anyone who reaches this port can use "
            f"the service; set {API_KEY_ENVIRONMENT_VARIABLE} or --api-key")


LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


def uvicorn_settings(config: ServeConfig) -> dict:
    log_config = {"version": 1, "disable_existing_loggers": False,
                  "formatters": {"plain": {"format": LOG_FORMAT}},
                  "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
                  "loggers": {"catdog": {"handlers": ["stderr"], "level": "INFO"},
                              "uvicorn": {"handlers": ["stderr"], "level": "INFO"}}}
    # access_log=False: the access middleware writes the request lines, with their request ids, instead.
    return dict(host=config.host, port=config.port, log_config=log_config, access_log=False, timeout_graceful_shutdown=30)


def run_server(config: ServeConfig) -> None:
    """uvicorn in this process (readiness turns false as soon as SIGTERM/SIGINT arrives; in-flight requests then
    finish), or with `--workers N` uvicorn's supervisor and N worker processes sharing the port."""
    import uvicorn

    warning = exposure_warning(config)
    if warning:
        print(warning, file=sys.stderr)
    print(f"catdog serve on http://{config.host}:{config.port}/ (model: {config.model}"
          f"{f', {config.workers} workers' if config.workers > 1 else ''}{', API key required' if config.api_key else ''})")
    if config.workers > 1:
        # The supervisor never loads a model: replace this process (same pid, so signals still reach it) by a lean
        # one running `supervise_workers` (the command line may have imported torch to export the model file).
        os.environ[CONFIG_ENVIRONMENT_VARIABLE] = json.dumps(dataclasses.asdict(config))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "catdog.serve.app"])

    app = create_app(config)

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service = getattr(app.state, "service", None)
            if service is not None:
                service.ready = False
            super().handle_exit(sig, frame)

    GracefulServer(uvicorn.Config(app, **uvicorn_settings(config))).run()


def supervise_workers(config: ServeConfig) -> None:
    """uvicorn's supervisor: binds the port, starts `config.workers` processes that each build the app with
    `create_app_from_env` (and load their model), restarts any that dies, and stops them all on SIGTERM/SIGINT."""
    import uvicorn

    uvicorn.run("catdog.serve.app:create_app_from_env", factory=True, workers=config.workers, **uvicorn_settings(config))


if __name__ == "__main__":  # `catdog serve --workers N` execs this
    supervise_workers(ServeConfig(**json.loads(os.environ[CONFIG_ENVIRONMENT_VARIABLE])))
