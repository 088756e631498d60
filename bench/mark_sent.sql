-- pgbench: the database's limit for a drain, 100 pre-filled unsent rows marked sent per UPDATE.
UPDATE pgbench_drain.transactions SET message_id = 'bench', queue_sent_at = now()
WHERE id IN (SELECT id FROM pgbench_drain.transactions WHERE message_id IS NULL AND failed_at IS NULL
             ORDER BY next_attempt_at, id LIMIT 100 FOR UPDATE SKIP LOCKED);
