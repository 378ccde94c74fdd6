"""``python -m services.webhook``: run the webhook service until SIGTERM."""

from services.webhook.app import create_app
from zapbus.config import load_settings
from zapbus.httpkit import run
from zapbus.logs import setup_logging


def main() -> None:
    settings = load_settings()
    setup_logging("webhook", settings.log_format, settings.log_level)
    run(
        create_app(settings),
        settings.webhook_host,
        settings.webhook_port,
        settings.shutdown_grace_seconds,
    )


if __name__ == "__main__":
    main()
