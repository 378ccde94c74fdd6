-- Pairing by code: a connection links either by scanning a QR (login 'qr') or by typing a code
-- on the phone (login 'code', for phone_number). The code shown and when it stops working;
-- when one was last asked for (new codes on request are rate-limited).
ALTER TABLE connections ADD COLUMN login text NOT NULL DEFAULT 'qr';
ALTER TABLE connections ADD COLUMN phone_number text;
ALTER TABLE connections ADD COLUMN pairing_code text;
ALTER TABLE connections ADD COLUMN pairing_code_expires_at timestamptz;
ALTER TABLE connections ADD COLUMN pairing_code_requested_at timestamptz;
