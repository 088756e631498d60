-- The records of retired keys go: replays older than retention are then
-- new transactions again, as before this migration.
DROP TABLE retired_transactions;
DROP INDEX transactions_dead_wallet_idx;
ALTER TABLE transactions DROP COLUMN skipped_at;
ALTER TABLE transactions ENABLE TRIGGER unsent_transactions_truncate;
ALTER TABLE transactions ENABLE TRIGGER unsent_transactions_follow;
