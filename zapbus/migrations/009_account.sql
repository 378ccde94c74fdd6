-- The WhatsApp account a connection is linked to, when the server says it (on connected).
ALTER TABLE connections ADD COLUMN account_phone text;
ALTER TABLE connections ADD COLUMN account_name text;
