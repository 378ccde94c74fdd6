-- Servers keyed by phone number (fazer) hold one connection per phone: the gateway looks for a
-- live connection of the tenant using a phone before a create (409 phone-in-use), and the
-- worker for one using it before deleting a phone's server connection.
CREATE INDEX connections_phone ON connections (phone_number, tenant_id)
    WHERE phone_number IS NOT NULL;
