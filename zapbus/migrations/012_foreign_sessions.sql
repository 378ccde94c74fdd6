-- The sessions a server holds for others (other apps sharing it), for placement: its /health
-- figure less zapbus's own sessions there when that figure was read. Placement counts a
-- server's load as zapbus's live placements now plus those foreign sessions, so a burst of
-- creates between two probes sees every placement it makes (the figure alone lags them).
ALTER TABLE baileys_servers ADD COLUMN sessions_ours integer;  -- zapbus's created sessions there, at the probe
