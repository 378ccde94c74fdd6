"""NATS header names zapbus sets on its messages."""

MSG_ID = "Nats-Msg-Id"  # JetStream de-duplication key
COMMAND_ID = "Zapbus-Command-Id"  # follows a request from gateway to projector
CONNECTION_ID = "Zapbus-Connection-Id"
# Attempts a command already spent before this message (a copy handed back on shutdown
# starts its deliveries from 1 again, but not its attempts).
ATTEMPTS_USED = "Zapbus-Attempts-Used"
