-- How far the notifier's fan-out has turned CONNECTION_CHANGES into webhook deliveries: the
-- stream sequence of the last change queued, written in the transaction that queues the
-- deliveries. A fan-out that takes over after a crash goes on from the change after it (reading
-- the stream itself for what the dead one had fetched and not acked) and never goes back, so a
-- connection's webhooks keep their order across any crash, with no wait for ack_wait.
CREATE TABLE notifier_checkpoints (
    stream      text PRIMARY KEY,
    stream_seq  bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
