-- Every statement below needs `transactions`; the strongest lock first, so
-- the migration never holds a weaker one (which blocks writers) while it
-- waits for the next. Under the migrator's 2 s lock timeout a try that
-- cannot get it gives up at once and is tried again later.
LOCK TABLE transactions IN ACCESS EXCLUSIVE MODE;

-- 1. `unsent_transactions` follows every writer, replication tools included.
-- Triggers are skipped under `session_replication_role = replica` (bulk
-- fixes, pg_restore, logical-replication appliers) unless they are ENABLE
-- ALWAYS: a row written there was unsent in `transactions` yet missing from
-- the narrow table, so it was never sent, counted or alerted on. The relay's
-- own connections still skip them (`txrelay.relay_writes`, see `follow!`).
-- Whatever still drifts (DISABLE TRIGGER, a direct edit of the narrow
-- table) is found by the relay's periodic reconciliation.
ALTER TABLE transactions ENABLE ALWAYS TRIGGER unsent_transactions_follow;
ALTER TABLE transactions ENABLE ALWAYS TRIGGER unsent_transactions_truncate;

-- 2. On a FIFO queue a dead-lettered row holds its wallet's later rows until
-- it is resolved: retried (it is unsent again), or skipped on purpose
-- (`txrelay skip ID`, recorded in resend_audit), which sets `skipped_at`.
-- The row stays dead-lettered and unsent; only its hold on the wallet ends.
-- Adding a nullable column without a default rewrites nothing.
ALTER TABLE transactions ADD COLUMN skipped_at timestamptz;
-- Does a dead-lettered, unresolved row hold this wallet? Dead-lettering,
-- retrying and skipping change `failed_at`/`skipped_at`; claiming and
-- recording a send change neither, so they stay HOT updates. Not built
-- CONCURRENTLY: that waits for every older snapshot in the database,
-- including a replica's migrator waiting on the migration lock held here,
-- which deadlocks. The build reads the table once, holding writes for that
-- long (docs/upgrading.md).
CREATE INDEX transactions_dead_wallet_idx
    ON transactions (wallet_address, id) WHERE failed_at IS NOT NULL AND skipped_at IS NULL;
-- Dead letters from before this release, whose wallet has already sent a
-- later row, were passed over under the earlier contract: holding their
-- wallet now would stall every new payment of it, and retrying them would
-- deliver them out of order. They count as skipped, as of this migration.
UPDATE transactions d SET skipped_at = now()
WHERE d.failed_at IS NOT NULL AND d.skipped_at IS NULL
  AND EXISTS (SELECT 1 FROM transactions l
              WHERE l.wallet_address = d.wallet_address AND l.id > d.id AND l.message_id IS NOT NULL);

-- 3. Idempotency outlives retention. When retention deletes a sent row, a
-- compact record of it stays here for the idempotency window (spec
-- `idempotencyWindow`, 30 days by default, never shorter than retention):
-- a late replay of the key is then answered 200 with the original message
-- id (or 409 for a different body), never sent twice.
CREATE TABLE retired_transactions (
    idempotency_key varchar(255) PRIMARY KEY,
    id              bigint       NOT NULL,
    reference       varchar(255) NOT NULL,
    wallet_address  varchar(255) NOT NULL,
    -- SHA-256 (hex) of the stored payload: what a replay's body must match.
    payload_digest  text         NOT NULL,
    message_id      varchar(255) NOT NULL,
    queue_sent_at   timestamptz  NOT NULL,
    created_at      timestamptz  NOT NULL,
    retired_at      timestamptz  NOT NULL DEFAULT now()
);
-- The window ends by creation time.
CREATE INDEX retired_transactions_created_at_idx ON retired_transactions (created_at);
