"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from catdog.serve.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health)
async def health() -> dict:
    """The process is alive and answering."""
    return {"status": "ok"}


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness, "description": "loading or shutting down"}})
async def ready(request: Request):
    """The model is loaded and warmed, and the server is not shutting down."""
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        return JSONResponse({"ready": False}, status_code=503)
    predictor = service.predictor
    return {"ready": True, "model": predictor.model_name, "classes": predictor.class_names,
            "zero_training": predictor.is_zero_training, "backend": predictor.backend}


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> PlainTextResponse:
    """Request counts and latencies, batch sizes, queue depth, images classified (Prometheus)."""
    return PlainTextResponse(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
