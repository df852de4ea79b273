"""The service's error type and its JSON body.

Every error the API returns has the body ``{"error": {"type": ..., "message": ..., "request_id": ...}}``;
``type`` is a stable machine-readable name (listed in ``ERROR_TYPES``), ``message`` is for people.
"""

from __future__ import annotations

from typing import Optional

# type -> (HTTP status, when it happens). The table is the contract documented in docs/serving.md.
ERROR_TYPES = {
    "invalid_request": (400, "the body is not valid JSON / multipart, or a field has the wrong type"),
    "invalid_base64": (400, "the JSON `image` field is not valid base64"),
    "not_an_image": (400, "the image bytes are not an image in any format the server reads"),
    "truncated_image": (400, "the image is truncated or corrupt and cannot be decoded"),
    "payload_too_large": (413, "the request body or the image exceeds --max-image-bytes"),
    "too_many_pixels": (413, "the image has more than --max-image-pixels pixels"),
    "unsupported_media_type": (415, "Content-Type is not multipart/form-data or application/json, or the "
                                    "image format is not one of the accepted formats"),
    "missing_field": (422, "a required field (`image`) is absent"),
    "invalid_field": (422, "a field is out of range, e.g. max_new_tokens outside [1, --max-new-tokens-limit]"),
    "invalid_input": (422, "the model rejected this request's input (e.g. a prompt longer than its context)"),
    "not_found": (404, "no such route"),
    "method_not_allowed": (405, "wrong HTTP method for the route"),
    "overloaded": (503, "the request queue is full (Retry-After says when to come back)"),
    "not_ready": (503, "the model is still loading or the server is shutting down (Retry-After is set)"),
    "internal_error": (500, "the model failed on this request for a reason that is not the input's fault"),
}


class ServeError(Exception):
    """An error with an HTTP status and a stable ``type`` name, turned into the JSON error body.

    Args:
        type: one of ``ERROR_TYPES``; it fixes the status code.
        message: a sentence saying what was wrong and what is accepted.
        retry_after: seconds, sent as the ``Retry-After`` header (503 answers).
    """

    def __init__(self, type: str, message: str, retry_after: Optional[int] = None):
        if type not in ERROR_TYPES:
            raise ValueError(f"unknown error type {type!r}; known: {sorted(ERROR_TYPES)}")
        super().__init__(message)
        self.type = type
        self.status = ERROR_TYPES[type][0]
        self.message = message
        self.retry_after = retry_after

    def body(self, request_id: Optional[str]) -> dict:
        return {"error": {"type": self.type, "message": self.message, "request_id": request_id}}
