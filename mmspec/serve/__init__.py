"""The captioning HTTP service: ``mmspec serve caption`` (FastAPI on uvicorn, dynamic batching).

``create_app`` builds the app around a ``CaptionPipeline``; ``Batcher`` gathers concurrent requests into
batched decodes; ``mmspec.serve.load`` is the load generator. See docs/serving.md.
"""

from .app import ServeSettings, create_app
from .batcher import Batcher, CaptionResult
from .errors import ERROR_TYPES, ServeError

__all__ = ["create_app", "ServeSettings", "Batcher", "CaptionResult", "ServeError", "ERROR_TYPES"]
