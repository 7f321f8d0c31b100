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
from catdog.serve.config import API_KEY_ENVIRONMENT_VARIABLE, ServeConfig
from catdog.runtime.model_file import load_model_file
from catdog.runtime.predict import Predictor
from catdog.serve import routes_explain, routes_health, routes_predict
from catdog.serve.access import AccessMiddleware, document_api_key, is_loopback
from catdog.serve.batching import MicroBatcher
from catdog.serve.observability import ServiceMetrics
from catdog.serve.schemas import error_response

logger = logging.getLogger("catdog.serve")
# `--workers N` starts N processes that each build the app from this variable (the config as JSON).
CONFIG_ENVIRONMENT_VARIABLE = "CATDOG_SERVE_CONFIG"


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
    exported file (the command line exports a run or the built-in model first: `model_files.open_model`)."""
    if predictor is None and not config.model:
        raise ValueError("serve needs an exported model file: --model FILE (`catdog export` writes one)")
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = predictor or await asyncio.to_thread(load_model_file, config.model, config.inference_threads, config.device,
                                                      config.ood_keep)

        def predict_batch(images: np.ndarray) -> list[tuple[np.ndarray, float | None, tuple[float, int, float] | None]]:
            """(probabilities, out-of-distribution score or None, the taught "neither" examples' (distance, nearest
            index, head score) or None) per image."""
            scored = loaded.score_batch(images, tta=config.tta, check_orientation=config.check_orientation)
            count = len(scored.probabilities)
            scores = [None] * count if scored.ood_scores is None else [float(score) for score in scored.ood_scores]
            taught = ([None] * count if scored.neither_distances is None else
                      [(float(d), int(i), float(h)) for d, i, h in
                       zip(scored.neither_distances, scored.nearest_neither, scored.neither_scores)])
            return list(zip(scored.probabilities, scores, taught))

        # The largest micro-batch: the size this network runs fastest at on this machine (measured once, then
        # cached), unless --max-batch-size says; a server's stream of photos always pays for the measurement.
        choice = await asyncio.to_thread(loaded.batch_size, None, config.max_batch_size, config.cache_dir or None,
                                         logger.info)
        batcher = MicroBatcher(predict_batch, choice.batch_size, config.max_wait_ms, config.max_queue, metrics)
        state = ServiceState(config, loaded, batcher, ThreadPoolExecutor(config.decode_threads, thread_name_prefix="catdog-decode"), metrics)
        app.state.service = state
        batcher.start()
        size = loaded.preprocess.input_size
        await batcher.submit(np.zeros((3, size, size), dtype=np.float32))  # warm-up: first-call allocations happen before /ready
        state.ready = True
        logger.info("catdog serve ready: %s, micro-batches of at most %s", loaded.describe(), choice.describe())
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
    plain_openapi = app.openapi

    def openapi_of_this_server() -> dict:
        """The schema with this server's own limits (the batch's most files) and, with a key, its security."""
        if app.openapi_schema is None:
            schema = plain_openapi()
            batch = schema["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
            batch["schema"]["properties"]["files"]["maxItems"] = config.max_batch_files
            app.openapi_schema = document_api_key(schema) if config.api_key else schema
        return app.openapi_schema

    app.openapi = openapi_of_this_server

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


def run_server(config: ServeConfig, predictor: Predictor | None = None) -> None:
    """uvicorn in this process (readiness turns false as soon as SIGTERM/SIGINT arrives; in-flight requests then
    finish), or with `--workers N` uvicorn's supervisor and N worker processes sharing the port. `predictor`, of
    `config.model` already opened by the caller, serves in this process (the workers each open the file)."""
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

    app = create_app(config, predictor)

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
