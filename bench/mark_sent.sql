-- pgbench: the database's limit for a drain, 100 pre-filled unsent rows marked
-- sent per statement as the schema keeps them: taken out of
-- unsent_transactions, message id set on transactions (a HOT update).
WITH done AS (
    DELETE FROM pgbench_drain.unsent_transactions
    WHERE id IN (SELECT id FROM pgbench_drain.unsent_transactions ORDER BY due_at, id LIMIT 100 FOR UPDATE SKIP LOCKED)
    RETURNING id)
UPDATE pgbench_drain.transactions SET message_id = 'bench', queue_sent_at = now(), updated_at = clock_timestamp()
FROM done WHERE transactions.id = done.id;
