"""``python -m services.notifier``: run the notifier until SIGTERM."""

from services.notifier.app import create_app
from zapbus.httpkit import serve

if __name__ == "__main__":
    serve("notifier", create_app, lambda s: (s.notifier_host, s.notifier_port))
