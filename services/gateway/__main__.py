"""``python -m services.gateway``: run the gateway until SIGTERM."""

from services.gateway.app import create_app
from zapbus.config import load_settings
from zapbus.httpkit import run
from zapbus.logs import setup_logging


def main() -> None:
    settings = load_settings()
    setup_logging("gateway", settings.log_format, settings.log_level)
    run(
        create_app(settings),
        settings.gateway_host,
        settings.gateway_port,
        settings.shutdown_grace_seconds,
    )


if __name__ == "__main__":
    main()
