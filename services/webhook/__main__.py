"""``python -m services.webhook``: run the webhook service until SIGTERM."""

from services.webhook.app import create_app
from zapbus.httpkit import serve

if __name__ == "__main__":
    serve("webhook", create_app, lambda s: (s.webhook_host, s.webhook_port))
