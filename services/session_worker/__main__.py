"""``python -m services.session_worker``: run the session worker until SIGTERM."""

from services.session_worker.app import create_app
from zapbus.config import load_settings
from zapbus.httpkit import run
from zapbus.logs import setup_logging


def main() -> None:
    settings = load_settings()
    setup_logging("session_worker", settings.log_format, settings.log_level)
    run(
        create_app(settings),
        settings.worker_host,
        settings.worker_port,
        settings.shutdown_grace_seconds,
    )


if __name__ == "__main__":
    main()
