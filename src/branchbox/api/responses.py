"""The fast path for JSON responses: serialise a response model once, in pydantic-core, and hand FastAPI a
finished ``Response`` (it then skips re-validating and re-encoding the return value). Routes keep their
``response_model=`` so the OpenAPI document still describes the body."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response

_JSON = "application/json"


class JsonResponse(Response):
    media_type = _JSON


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    """One model -> a JSON response (pydantic's JSON mode: datetimes as ISO 8601, enums as values)."""
    return JsonResponse(model.__pydantic_serializer__.to_json(model), status_code=status_code)


def error_json(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    """The one error body: ``{"error": {"code", "message"[, "details"]}}``."""
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return json.dumps({"error": body}).encode("utf-8")
