"""The API contract: response and error models, the statuses each endpoint documents, and the error response.

Routes declare `response_model=` and `responses=` from here, so `/openapi.json` describes every body the service
sends and a client can be generated from it (`/docs` shows the same). A route that classifies uploads (predict,
predict/batch, and any later one such as explain) documents its errors with `PREDICT_ERROR_RESPONSES`; when the
server has an API key, `access.document_api_key` adds the 401 and the bearer scheme to every protected operation.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error the service answers (4xx and 5xx)."""

    error: str = Field(description="what went wrong, short and stable (e.g. 'upload too large', 'not an image or unsupported format')")
    detail: str = Field(description="the specifics: file name, sizes, limits, the decoder's message")


class Timing(BaseModel):
    decode: float = Field(description="milliseconds reading and preprocessing the upload")
    inference: float = Field(description="milliseconds waiting for and running the model (micro-batched)")
    total: float = Field(description="milliseconds in the server for this image")


class Prediction(BaseModel):
    """The classification of one image."""

    label: str = Field(description="the most probable class")
    confidence: float = Field(ge=0, le=1, description="the probability of `label`")
    probabilities: dict[str, float] = Field(description="probability per class name (they sum to 1)")
    in_distribution: bool = Field(description="false when the photo is unlike the training photos: the answer is "
                                              "\"neither\", and `label` is only the nearest class (always true for a "
                                              "model without an out-of-distribution score)")
    ood_score: float | None = Field(description="how unlike the training photos the photo is (higher: less alike); "
                                                "`in_distribution` is false above the model's threshold; null for a "
                                                "model without a score")
    model: str = Field(description="the model's name")
    zero_training: bool = Field(description="true for the built-in zero-training cat/dog model (no run given)")
    timing_ms: Timing
    # Only from a model trained with taught examples of "neither" (`catdog train --neither DIR`); absent otherwise.
    neither_score: float | None = Field(None, description="only for a model taught examples of \"neither\": their "
                                                          "head's score (higher: more like them than like the "
                                                          "training photos)")
    neither_distance: float | None = Field(None, description="only for a model taught examples of \"neither\": the "
                                                             "distance to the nearest of them (lower: more alike)")
    refused_by: Literal["", "unlike the training photos", "like a taught neither example"] | None = Field(
        None, description="only for a model taught examples of \"neither\": why the photo is neither (\"unlike the "
                          "training photos\": the out-of-distribution score; \"like a taught neither example\": the "
                          "examples' head, or nearer one of them than any validation photo), or \"\" when it is not")
    nearest_neither: str | None = Field(None, description="only for a model taught examples of \"neither\": the "
                                                          "file name of the nearest taught example, when the "
                                                          "examples refused the photo; null otherwise")


class Explanation(Prediction):
    """The classification of one image and the Grad-CAM heatmap of the predicted class over it."""

    overlay_png: str = Field(description="the photo with the heatmap of the predicted class over it: a PNG, base64-encoded")


class FilePrediction(Prediction):
    """A file of a batch that was classified."""

    file: str = Field(description="the uploaded file's name")


class FileError(ErrorBody):
    """A file of a batch that could not be classified (the other files still are)."""

    file: str = Field(description="the uploaded file's name")
    status: int = Field(description="the status this file alone would have got from /predict (413, 415, 422, 503)")


class BatchResult(BaseModel):
    """One result or one error per uploaded file, in upload order."""

    results: list[FilePrediction | FileError]
    count: int = Field(ge=1, description="files received")
    failed: int = Field(ge=0, description="files that got an error instead of a prediction")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    """Whether the model is loaded and warmed; the model's details once it is."""

    ready: bool
    model: str | None = None
    classes: list[str] | None = None
    zero_training: bool | None = None
    backend: str | None = None


def _error(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


PREDICT_ERROR_RESPONSES: dict[int | str, dict] = {
    413: _error("upload, image (pixels) or number of files over the server's limits"),
    415: _error("not an image, or an image format that is not accepted"),
    422: _error("no file, a text field where a file belongs, a malformed form, or an empty, truncated or corrupt image"),
    503: _error("model not ready, shutting down, or inference queue full; retry after `Retry-After` seconds"),
}
UNAUTHORIZED_RESPONSE = _error("missing or wrong `Authorization: Bearer <key>` (only when the server has an API key)")


def error_response(status: int, error: str, detail: str = "", headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=error, detail=detail).model_dump(), status_code=status, headers=headers)
