"""``python -m services.gateway``: run the gateway until SIGTERM."""

from services.gateway.app import create_app
from zapbus.httpkit import serve

if __name__ == "__main__":
    serve("gateway", create_app, lambda s: (s.gateway_host, s.gateway_port))
