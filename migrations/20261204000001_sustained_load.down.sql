ALTER TABLE unsent_transactions RESET (
    autovacuum_vacuum_scale_factor,
    autovacuum_vacuum_threshold,
    autovacuum_vacuum_cost_delay,
    autovacuum_analyze_scale_factor,
    autovacuum_analyze_threshold
);

-- Back to the fillfactor the table was created with
-- (20261126000001_create_transactions), not the server's default of 100.
ALTER TABLE transactions SET (fillfactor = 80);
