"""The HTTP front end of KAWHI (`kawhi serve`): FastAPI + uvicorn around the engine.

``create_app`` builds the ASGI app; ``kawhi.server.main`` runs it. See docs/server.md.
"""

from kawhi.server.app import create_app
from kawhi.server.settings import Settings

__all__ = ["Settings", "create_app"]
