-- Servers keyed by phone number (fazer) need it to delete a session: kept with each tracked
-- delete, so a re-driven delete still knows it after any restart.
ALTER TABLE session_deletes ADD COLUMN phone_number text;
