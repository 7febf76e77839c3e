"""oodflow's scoring service: FastAPI over exported flow graphs (DESIGN §6).

`create_app(settings)` builds the app; `run(settings)` serves it with uvicorn (`oodflow serve`).
"""

from service.app import create_app, run
from service.settings import Settings

__all__ = ["Settings", "create_app", "run"]
