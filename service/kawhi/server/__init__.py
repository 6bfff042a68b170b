"""The HTTP front end of KAWHI: FastAPI framing over the serving core (kawhi.pipeline.service).

``create_app`` builds the ASGI app; ``kawhi.server.main`` holds the uvicorn server that
runs it; ``kawhi serve`` (kawhi.serve) composes them. See docs/server.md.
"""

from kawhi.server.app import create_app
from kawhi.settings import Settings

__all__ = ["Settings", "create_app"]
