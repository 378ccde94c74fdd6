"""``python -m services.session_worker``: run the session worker until SIGTERM."""

from services.session_worker.app import create_app
from zapbus.httpkit import serve

if __name__ == "__main__":
    serve("session_worker", create_app, lambda s: (s.worker_host, s.worker_port))
