"""Run the Baileys simulator: ``python -m services.baileys_sim``.

Configuration comes from ``ZAPBUS_SIM_*`` / ``ZAPBUS_BAILEYS_API_KEY`` (see ``config.py``).
``web.run_app`` handles SIGINT/SIGTERM: pending hangs are cut short and session tasks cancelled.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from aiohttp import web

from .app import create_app
from .config import load_sim_config


def _announce(*args: Any, **kwargs: Any) -> None:
    """Print run_app's banner as one line: ``baileys_sim listening on http://host:port``."""
    text = " ".join(str(a) for a in args).splitlines()[0].strip("= ")
    print(text.replace("Running on", "baileys_sim listening on"), flush=True)


def main() -> None:
    """Load the configuration from the environment and serve until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=os.environ.get("ZAPBUS_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_sim_config(os.environ)
    except ValueError as exc:
        print(f"baileys_sim: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        print=_announce,
        shutdown_timeout=5.0,
    )


if __name__ == "__main__":
    main()
