"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict:
    """The process is alive and answering."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    """The model is loaded and warmed, and the server is not shutting down."""
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        return JSONResponse({"ready": False}, status_code=503)
    predictor = service.predictor
    return {"ready": True, "model": predictor.model_name, "classes": predictor.class_names,
            "zero_training": predictor.is_zero_training, "backend": predictor.backend}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
