-- zapbus schema, version 1: tenants, connections, their history, the command outbox.

CREATE TABLE tenants (
    id           uuid PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    -- sha256 of the API key: keys are 256-bit random tokens, so a fast hash is enough
    api_key_hash bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE connections (
    id                uuid PRIMARY KEY,
    tenant_id         uuid NOT NULL REFERENCES tenants (id),
    name              text NOT NULL,
    generation        integer NOT NULL DEFAULT 1,
    session_name      text NOT NULL,
    status            text NOT NULL,
    status_reason     text,
    qr                text,
    qr_seq            integer NOT NULL DEFAULT 0,
    qr_expires_at     timestamptz,
    attempts          integer NOT NULL DEFAULT 0,
    idempotency_key   text,
    request_hash      bytea,
    last_event_at     timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    status_changed_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX connections_tenant_created ON connections (tenant_id, created_at DESC, id);
CREATE INDEX connections_live_status ON connections (status, status_changed_at)
    WHERE status IN ('pending', 'creating', 'awaiting_qr');

-- Every event the projector saw for a connection, applied or not, in stream order.
CREATE TABLE connection_events (
    seq           bigserial PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    connection_id uuid NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    generation    integer NOT NULL,
    event_type    text NOT NULL,
    from_status   text,
    to_status     text,
    applied       boolean NOT NULL,
    code          integer,
    reason        text,
    command_id    uuid,
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX connection_events_connection ON connection_events (connection_id, seq);

-- Transactional outbox: written in the same transaction as the connection row, relayed to
-- JetStream (Nats-Msg-Id = msg_id) and deleted once JetStream acknowledged it.
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    msg_id     text NOT NULL UNIQUE,
    subject    text NOT NULL,
    payload    bytea NOT NULL,
    headers    jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts   integer NOT NULL DEFAULT 0
);
