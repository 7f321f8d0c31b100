"""The FastAPI application: configuration, lifespan (model loaded and warmed once, at start-up), error handling
and the uvicorn server with graceful shutdown.

Every error is JSON `{"error": ..., "detail": ...}` with a 4xx status that says what was wrong; an unexpected
exception still answers JSON, and is logged, rather than killing the process.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from catdog.config import option
from catdog.images import DEFAULT_MAX_PIXELS
from catdog.serve.batching import MicroBatcher
from catdog.serve.observability import ServiceMetrics

logger = logging.getLogger("catdog.serve")


@dataclass
class ServeConfig:
    run: str = option("", "run directory; empty: the built-in zero-training cat/dog model")
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = option(8000, "port")
    backend: str = option("auto", "auto (ONNX Runtime on CPU, PyTorch on CUDA), torch or onnxruntime", choices=("auto", "torch", "onnxruntime"))
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    max_batch_size: int = option(16, "most images in one inference batch")
    max_wait_ms: float = option(10.0, "longest wait for more images before running a batch")
    max_queue: int = option(128, "images waiting for inference before new requests get 503")
    max_upload_mb: float = option(10.0, "largest accepted upload per image, in MB (larger: 413)")
    max_batch_files: int = option(32, "most files in one /predict/batch request")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "largest accepted image in pixels (larger: 413)")
    decode_threads: int = option(2, "threads decoding uploads")
    tta: bool | None = option(None, "test-time augmentation (average over the image and its mirror image); default: as the run was validated")

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError("--port must be in 1..65535")
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_batch_files < 1 or self.decode_threads < 1:
            raise ValueError("batch size, queue, batch files and decode threads must be at least 1")
        if self.max_upload_mb <= 0 or self.max_wait_ms < 0:
            raise ValueError("--max-upload-mb must be positive and --max-wait-ms not negative")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass
class ServiceState:
    """What the routes need, created in the lifespan and kept on `app.state.service`."""

    config: ServeConfig
    predictor: object
    batcher: MicroBatcher
    decoder: ThreadPoolExecutor
    metrics: ServiceMetrics
    ready: bool = False


def error_response(status: int, error: str, detail: str = "", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def create_app(config: ServeConfig, predictor=None) -> FastAPI:
    """The app. `predictor` may be given (tests); otherwise it is loaded from `config.run` in the lifespan."""
    from catdog.predict import load_predictor
    from catdog.serve import routes_health, routes_predict

    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = predictor or await asyncio.to_thread(load_predictor, config.run, config.backend, config.device)

        def predict_batch(images: torch.Tensor):
            return loaded.probabilities(images, tta=config.tta)

        batcher = MicroBatcher(predict_batch, config.max_batch_size, config.max_wait_ms, config.max_queue, metrics)
        state = ServiceState(config, loaded, batcher, ThreadPoolExecutor(config.decode_threads, thread_name_prefix="catdog-decode"), metrics)
        app.state.service = state
        batcher.start()
        size = loaded.preprocess.input_size
        await batcher.submit(torch.zeros(3, size, size))  # warm-up: first-call allocations happen before /ready
        state.ready = True
        logger.info("catdog serve ready: %s", loaded.describe())
        yield
        state.ready = False
        await batcher.stop()
        state.decoder.shutdown(wait=False)

    app = FastAPI(title="catdog", description="Image classification service", lifespan=lifespan)
    app.include_router(routes_predict.router)
    app.include_router(routes_health.router)

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
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal error", type(error).__name__)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        import time

        started = time.perf_counter()
        response = await call_next(request)
        route = request.url.path if request.url.path in ("/predict", "/predict/batch", "/", "/health", "/ready") else "other"
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        return response

    return app


def run_server(config: ServeConfig) -> None:
    """uvicorn with readiness turned false as soon as SIGTERM/SIGINT arrives; in-flight requests then finish."""
    import uvicorn

    app = create_app(config)

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service = getattr(app.state, "service", None)
            if service is not None:
                service.ready = False
            super().handle_exit(sig, frame)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = GracefulServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           timeout_graceful_shutdown=30))
    print(f"catdog serve on http://{config.host}:{config.port}/ (model: {config.run or 'built-in zero-training cat/dog model'})")
    server.run()
