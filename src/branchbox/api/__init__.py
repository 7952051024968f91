"""The HTTP API (FastAPI): ``create_app(manager, settings)``; routes under /v1, /health, /version, /metrics"""

from branchbox.api.app import create_app, openapi_document, openapi_json
from branchbox.api.metrics import Metrics
from branchbox.api.settings import ApiSettings

__all__ = ["ApiSettings", "Metrics", "create_app", "openapi_document", "openapi_json"]
