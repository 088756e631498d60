-- Unsent rows get a narrow table of their own, so that recording a message
-- id is a HOT update of `transactions`.
--
-- Before this, `message_id` and `failed_at` appeared in the predicates of the
-- partial indexes that find due rows, so setting a message id could never be
-- a HOT update: PostgreSQL rewrote the wide row and added an entry to each of
-- its indexes, then vacuumed them all. Now no index of `transactions` covers
-- a column that sending, claiming, backing off or releasing changes, and the
-- questions "what is due", "is an older row of this wallet unsent" and "how
-- big is the backlog" are asked of `unsent_transactions`, which holds exactly
-- the unsent rows (neither sent nor dead-lettered).
--
-- `transactions` keeps every column with its meaning; readers need no change.
-- The relay keeps `unsent_transactions` in step in the same statements that
-- change `transactions`; every other writer (psql, the old tools) is kept in
-- step by the triggers below. The relay marks its own connections with the
-- setting `txrelay.relay_writes = on` so the triggers skip its statements.

-- Writers wait until the copy below and the triggers are in place: a row
-- written by a relay still on the earlier schema between the copy and the
-- triggers would otherwise be missing here, or listed after it was sent.
LOCK TABLE transactions IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE unsent_transactions (
    id             bigint       PRIMARY KEY,
    wallet_address varchar(255) NOT NULL,
    created_at     timestamptz  NOT NULL,
    -- As in `transactions`: held by a process until then.
    claimed_until  timestamptz,
    -- When a sweep may claim the row: its backoff, or the end of the lease of
    -- the process that holds it, whichever is later.
    due_at         timestamptz  NOT NULL
);

INSERT INTO unsent_transactions (id, wallet_address, created_at, claimed_until, due_at)
SELECT id, wallet_address, created_at, claimed_until, greatest(next_attempt_at, coalesce(claimed_until, next_attempt_at))
FROM transactions
WHERE message_id IS NULL AND failed_at IS NULL;

-- Claim order.
CREATE INDEX unsent_transactions_due_idx ON unsent_transactions (due_at, id);
-- FIFO queues: is an older row of this wallet still unsent?
CREATE INDEX unsent_transactions_wallet_idx ON unsent_transactions (wallet_address, id);

DROP INDEX transactions_unsent_due_idx;
DROP INDEX transactions_unsent_wallet_idx;
DROP INDEX transactions_sent_idx;
-- Retention deletes by age; created_at never changes, so this index costs one
-- entry per insert and nothing afterwards.
CREATE INDEX transactions_created_at_idx ON transactions (created_at);

CREATE FUNCTION unsent_transactions_follow() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        IF TG_OP = 'DELETE' OR OLD.id <> NEW.id THEN
            DELETE FROM unsent_transactions WHERE id = OLD.id;
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        IF NEW.message_id IS NULL AND NEW.failed_at IS NULL THEN
            INSERT INTO unsent_transactions (id, wallet_address, created_at, claimed_until, due_at)
            VALUES (NEW.id, NEW.wallet_address, NEW.created_at, NEW.claimed_until,
                    greatest(NEW.next_attempt_at, coalesce(NEW.claimed_until, NEW.next_attempt_at)))
            ON CONFLICT (id) DO UPDATE SET wallet_address = EXCLUDED.wallet_address,
                created_at = EXCLUDED.created_at, claimed_until = EXCLUDED.claimed_until,
                due_at = EXCLUDED.due_at;
        ELSE
            DELETE FROM unsent_transactions WHERE id = NEW.id;
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER unsent_transactions_follow
    AFTER INSERT OR UPDATE OR DELETE ON transactions
    FOR EACH ROW
    WHEN (current_setting('txrelay.relay_writes', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION unsent_transactions_follow();

CREATE FUNCTION unsent_transactions_truncate() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    TRUNCATE unsent_transactions;
    RETURN NULL;
END
$$;

CREATE TRIGGER unsent_transactions_truncate
    AFTER TRUNCATE ON transactions
    FOR EACH STATEMENT EXECUTE FUNCTION unsent_transactions_truncate();

-- The relay sets updated_at itself in each of its statements: a PL/pgSQL
-- call per updated row was a measurable part of every claim and result.
DROP TRIGGER transactions_touch_updated_at ON transactions;
CREATE TRIGGER transactions_touch_updated_at
    BEFORE UPDATE ON transactions
    FOR EACH ROW
    WHEN (current_setting('txrelay.relay_writes', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION transactions_touch_updated_at();
