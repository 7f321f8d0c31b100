"""The page and the prediction endpoints."""

from __future__ import annotations

import asyncio
import time
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile

from catdog.runtime.images import ImageLoadError, load_image
from catdog.serve.batching import Overloaded
from catdog.serve.schemas import PREDICT_ERROR_RESPONSES, BatchResult, Prediction, error_response

router = APIRouter()
MULTIPART_OVERHEAD = 64 * 1024
STATUS_FOR_REASON = {
    "not an image or unsupported format": 415,
    "too many pixels": 413,
}
RETRY_AFTER_SECONDS = "1"


class RequestProblem(Exception):
    def __init__(self, status: int, error: str, detail: str = ""):
        self.status, self.error, self.detail = status, error, detail


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(resources.files("catdog.serve").joinpath("static/index.html").read_text(encoding="utf-8"))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes without reading it all first."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestProblem(413, "upload too large", f"{int(declared)} bytes > limit {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestProblem(413, "upload too large", f"more than {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse what was already read
    return body


async def uploaded_files(request: Request, field_names: tuple[str, ...], body_limit: int, max_files: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each upload: multipart fields `field_names`, or the raw body for non-multipart."""
    body = await read_body(request, body_limit)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        if not body:
            raise RequestProblem(422, "missing file", "send multipart/form-data with a 'file' field, or the image as the body")
        return [("<body>", body)]
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 10, max_part_size=body_limit)
    except Exception as error:  # malformed multipart, too many parts
        if "too many files" in str(error).lower():
            raise RequestProblem(422, "too many files", f"more than the limit of {max_files} (the schema's maxItems)") from error
        raise RequestProblem(422, "malformed multipart form", str(error)) from error
    files = []
    for name in field_names:
        for value in form.getlist(name):
            if isinstance(value, UploadFile):
                files.append((value.filename or name, await value.read()))
            else:
                raise RequestProblem(422, "wrong form field type", f"field '{name}' must be a file, got text")
    if not files:
        raise RequestProblem(422, "missing file", f"no file in form field(s) {', '.join(repr(n) for n in field_names)}; "
                                                   f"got fields {sorted(form.keys())}")
    if len(files) > max_files:
        raise RequestProblem(422, "too many files", f"{len(files)} > limit {max_files} (the schema's maxItems)")
    return files


def decode(service, name: str, data: bytes):
    """The upload as the model's input array."""
    return service.predictor.transform(decode_image(service, name, data))


def decode_image(service, name: str, data: bytes, full_size: bool = False):
    """The upload as an RGB image (JPEGs drafted down to what the model needs unless `full_size`), or a
    RequestProblem with the status its fault deserves."""
    config = service.config
    if len(data) > config.max_upload_bytes:
        raise RequestProblem(413, "upload too large", f"{name}: {len(data)} bytes > limit {config.max_upload_bytes}")
    try:
        draft_size = None if full_size else service.predictor.preprocess.resize_size
        image = load_image(data, max_pixels=config.max_pixels, name=name, draft_size=draft_size)
    except ImageLoadError as error:
        status = STATUS_FOR_REASON.get(error.reason, 422)
        raise RequestProblem(status, error.reason, str(error)) from error
    return image


async def classify(service, name: str, data: bytes) -> dict:
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    tensor = await loop.run_in_executor(service.decoder, decode, service, name, data)
    decoded = time.perf_counter()
    try:
        probabilities, ood_score, taught = await service.batcher.submit(tensor)
    except Overloaded as error:
        raise RequestProblem(503, "overloaded", str(error)) from error
    finished = time.perf_counter()
    return answer(service, probabilities, ood_score, {"decode": decoded - started, "inference": finished - decoded,
                                                      "total": finished - started}, taught)


def answer(service, probabilities, ood_score: float | None, seconds: dict[str, float],
           taught: tuple[float, int, float] | None = None) -> dict:
    """The JSON of one classified image (`schemas.Prediction`); counts the answers that said neither. `taught`: the
    distance to the taught "neither" examples, the nearest one's index and their head's score, for a model that has
    them (the answer then has `neither_score`, `neither_distance`, `refused_by` and `nearest_neither` too)."""
    predictor = service.predictor
    best = int(probabilities.argmax())
    decision = predictor.decide(ood_score, *(taught or (None, None, None)))
    if not decision.in_distribution:
        service.metrics.out_of_distribution.inc()
    body = {
        "label": predictor.class_names[best],
        "confidence": round(float(probabilities[best]), 6),
        "probabilities": {name: round(float(p), 6) for name, p in zip(predictor.class_names, probabilities)},
        "in_distribution": decision.in_distribution,
        "ood_score": None if ood_score is None else round(float(ood_score), 6),
        "model": predictor.model_name,
        "zero_training": predictor.is_zero_training,
        "timing_ms": {name: round(1000 * value, 2) for name, value in seconds.items()},
    }
    if predictor.has_taught_neither and taught is not None:  # only a model taught examples of "neither" says these
        body.update({"neither_score": round(float(taught[2]), 6), "neither_distance": round(float(taught[0]), 6),
                     "refused_by": decision.refused_by,
                     "nearest_neither": decision.nearest_neither or None})
    return body


def problem_response(problem: RequestProblem) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if problem.status == 503 else None
    return error_response(problem.status, problem.error, problem.detail, headers)


def not_ready(service) -> JSONResponse | None:
    if service is None or not service.ready:
        return error_response(503, "not ready", "the model is loading or the server is shutting down", {"Retry-After": "2"})
    return None


# The routes read the body themselves (to refuse oversized uploads before reading them whole), so the request
# bodies are documented here rather than derived from parameters.
# An image file is never empty: the schema says so (minLength 1), so that a client generated from it, or a fuzzer
# such as schemathesis, knows that an empty upload is refused (422) rather than a valid request.
IMAGE_FILE = {"type": "string", "format": "binary", "minLength": 1, "description": "a JPEG, PNG, WebP, BMP, GIF or TIFF image (not empty)"}
UPLOAD_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": IMAGE_FILE}, "required": ["file"]}},
    "image/jpeg": {"schema": IMAGE_FILE},
    "image/png": {"schema": IMAGE_FILE},
}}}
# A batch answers one result or one error per file (an empty or non-image file gets its own 422 or 415 inside a
# 200), so its items are any files: the schema must not refuse what the endpoint rightly accepts.
BATCH_FILE = {"type": "string", "format": "binary", "description": "an image; a file that is not one gets its own error in `results`"}
BATCH_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"files": {"type": "array", "items": BATCH_FILE, "minItems": 1}},
    "required": ["files"]}}}}}


@router.post("/predict", openapi_extra=UPLOAD_DOC, tags=["prediction"], response_model=Prediction,
             response_model_exclude_unset=True, responses=PREDICT_ERROR_RESPONSES)
async def predict(request: Request):
    """Classify one image: multipart field `file`, or the raw image as the request body."""
    service = getattr(request.app.state, "service", None)
    unavailable = not_ready(service)
    if unavailable:
        return unavailable
    try:
        ((name, data),) = await uploaded_files(request, ("file",), service.config.max_upload_bytes + MULTIPART_OVERHEAD, 1)
        return await classify(service, name, data)
    except RequestProblem as problem:
        return problem_response(problem)
    except ValueError:
        return error_response(422, "one file expected", "use /predict/batch for several files")


@router.post("/predict/batch", openapi_extra=BATCH_DOC, tags=["prediction"], response_model=BatchResult,
             response_model_exclude_unset=True, responses={**PREDICT_ERROR_RESPONSES, 422: {**PREDICT_ERROR_RESPONSES[422], "description":
                        "no file, a malformed form, or more files than --max-batch-files (the schema's maxItems)"}})
async def predict_batch(request: Request):
    """Classify several images (multipart fields `files`, or repeated `file`): one result or one error per file, in order."""
    service = getattr(request.app.state, "service", None)
    unavailable = not_ready(service)
    if unavailable:
        return unavailable
    config = service.config
    try:
        files = await uploaded_files(request, ("files", "file"), config.max_batch_files * (config.max_upload_bytes + MULTIPART_OVERHEAD),
                                     config.max_batch_files)
    except RequestProblem as problem:
        return problem_response(problem)

    async def one(name: str, data: bytes) -> dict:
        try:
            return {"file": name, **(await classify(service, name, data))}
        except RequestProblem as problem:
            return {"file": name, "status": problem.status, "error": problem.error, "detail": problem.detail}

    results = await asyncio.gather(*(one(name, data) for name, data in files))
    return {"results": results, "count": len(results), "failed": sum("error" in r for r in results)}
