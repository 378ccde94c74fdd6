"""``python -m services.projector``: run the projector until SIGTERM."""

from services.projector.app import create_app
from zapbus.config import load_settings
from zapbus.httpkit import run
from zapbus.logs import setup_logging


def main() -> None:
    settings = load_settings()
    setup_logging("projector", settings.log_format, settings.log_level)
    run(
        create_app(settings),
        settings.projector_host,
        settings.projector_port,
        settings.shutdown_grace_seconds,
    )


if __name__ == "__main__":
    main()
