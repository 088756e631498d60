-- The indexes as 20261201000002_unsent_transactions created them.
DROP INDEX unsent_transactions_due_idx;
CREATE INDEX unsent_transactions_due_idx ON unsent_transactions (due_at, id);
DROP INDEX unsent_transactions_wallet_idx;
CREATE INDEX unsent_transactions_wallet_idx ON unsent_transactions (wallet_address, id);
