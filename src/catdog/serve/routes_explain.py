"""`POST /explain`: the prediction for one image plus the Grad-CAM overlay of the predicted class (catdog.runtime.explain).

It takes the same uploads as /predict and answers bad ones the same way (the upload helpers are routes_predict's).
The heatmaps come from the exported file itself (its "class_maps" output), so it runs on the served session,
outside the micro-batcher; a file without heatmaps answers 501.
"""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import APIRouter, Request

from catdog.runtime.explain import explain_photo

from catdog.serve.routes_predict import (
    MULTIPART_OVERHEAD,
    UPLOAD_DOC,
    RequestProblem,
    answer,
    decode_image,
    not_ready,
    problem_response,
    uploaded_files,
)
from catdog.serve.schemas import PREDICT_ERROR_RESPONSES, ErrorBody, Explanation, error_response

router = APIRouter()


@router.post("/explain", openapi_extra=UPLOAD_DOC, tags=["prediction"], response_model=Explanation,
             response_model_exclude_unset=True,
             responses={**PREDICT_ERROR_RESPONSES, 501: {"model": ErrorBody, "description": "the served model file has no heatmaps"}})
async def explain(request: Request):
    """Classify one image (multipart field `file`, or the raw image as the body) and return the Grad-CAM heatmap of
    the predicted class over it, as a base64 PNG."""
    service = getattr(request.app.state, "service", None)
    unavailable = not_ready(service)
    if unavailable:
        return unavailable
    try:
        files = await uploaded_files(request, ("file",), service.config.max_upload_bytes + MULTIPART_OVERHEAD, 1)
        if len(files) != 1:  # as /predict answers
            return error_response(422, "one file expected", "send one image; /explain explains one at a time")
        ((name, data),) = files
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        photo = await loop.run_in_executor(service.decoder, decode_image, service, name, data, True)  # overlay: full size
        decoded = time.perf_counter()
        if not service.predictor.has_heatmaps:
            return error_response(501, "no heatmaps", f"{service.predictor.source}: this model file has no class_maps output")
        explanation = await asyncio.to_thread(explain_photo, service.predictor, photo, service.config.tta, None,
                                              service.config.check_orientation)
        overlay = await loop.run_in_executor(service.decoder, explanation.overlay_png)
    except RequestProblem as problem:
        return problem_response(problem)
    finished = time.perf_counter()
    seconds = {"decode": decoded - started, "inference": finished - decoded, "total": finished - started}
    taught = (None if explanation.neither_distance is None
              else (explanation.neither_distance, explanation.nearest_neither_index, explanation.neither_score))
    return {**answer(service, explanation.probabilities, explanation.ood_score, seconds, taught),
            "overlay_png": base64.b64encode(overlay).decode("ascii")}
