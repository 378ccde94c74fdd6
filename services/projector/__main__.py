"""``python -m services.projector``: run the projector until SIGTERM."""

from services.projector.app import create_app
from zapbus.httpkit import serve

if __name__ == "__main__":
    serve("projector", create_app, lambda s: (s.projector_host, s.projector_port))
