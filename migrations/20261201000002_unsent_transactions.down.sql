-- Every state lives in `transactions` throughout, so going back converts
-- nothing: the partial indexes are rebuilt from the rows themselves.
DROP TRIGGER transactions_touch_updated_at ON transactions;
CREATE TRIGGER transactions_touch_updated_at
    BEFORE UPDATE ON transactions
    FOR EACH ROW EXECUTE FUNCTION transactions_touch_updated_at();

DROP TRIGGER unsent_transactions_truncate ON transactions;
DROP FUNCTION unsent_transactions_truncate();
DROP TRIGGER unsent_transactions_follow ON transactions;
DROP FUNCTION unsent_transactions_follow();

DROP INDEX transactions_created_at_idx;
CREATE INDEX transactions_unsent_due_idx ON transactions (next_attempt_at, id)
    WHERE message_id IS NULL AND failed_at IS NULL;
CREATE INDEX transactions_unsent_wallet_idx ON transactions (wallet_address, id)
    WHERE message_id IS NULL AND failed_at IS NULL;
CREATE INDEX transactions_sent_idx ON transactions (queue_sent_at)
    WHERE message_id IS NOT NULL;

DROP TABLE unsent_transactions;
