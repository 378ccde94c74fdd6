"""NATS header names zapbus sets on its messages."""

MSG_ID = "Nats-Msg-Id"  # JetStream de-duplication key
COMMAND_ID = "Zapbus-Command-Id"  # follows a request from gateway to projector
CONNECTION_ID = "Zapbus-Connection-Id"
