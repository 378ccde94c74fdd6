"""Messages and names shared by every zapbus service over NATS JetStream."""
