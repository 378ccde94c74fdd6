-- Webhooks to the tenant's backend (the notifier): endpoints, one delivery per (endpoint,
-- change, event type), and every attempt of it. Deliveries of one endpoint and connection
-- go out in id order, each only after the one before succeeded or was given up.
CREATE TABLE webhook_endpoints (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (id),
    url              text NOT NULL,
    events           text[] NOT NULL,
    description      text,
    secret           text NOT NULL,
    -- after a rotation the old secret keeps signing beside the new one until this time
    previous_secret  text,
    previous_until   timestamptz,
    enabled          boolean NOT NULL DEFAULT true,
    disabled_reason  text,
    disabled_at      timestamptz,
    -- the first failure since the last success (NULL: the last attempt succeeded)
    failing_since    timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id, created_at DESC);

CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    webhook_id      text NOT NULL UNIQUE,          -- the webhook-id header, on every attempt
    endpoint_id     uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    connection_id   uuid NOT NULL,                 -- the order key (nil uuid: test events)
    event_type      text NOT NULL,
    payload         bytea NOT NULL,                -- the exact body, signed at each attempt
    state           text NOT NULL DEFAULT 'pending',  -- pending | succeeded | given_up
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- a notifier is sending it until then (a killed one's claim simply runs out)
    claimed_until   timestamptz,
    retry_from      timestamptz NOT NULL DEFAULT now(),  -- retries stop RETRY_FOR after it
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX webhook_deliveries_queue ON webhook_deliveries (endpoint_id, connection_id, id)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id DESC);

CREATE TABLE webhook_attempts (
    id              bigserial PRIMARY KEY,
    delivery_id     bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt         integer NOT NULL,
    status_code     integer,
    error           text,
    duration_ms     double precision NOT NULL,
    attempted_at    timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz                    -- when it is tried again (NULL: it is not)
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, attempt);
