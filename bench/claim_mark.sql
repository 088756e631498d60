-- pgbench: the fair drain baseline, the least SQL any correct relay on this
-- schema runs per batch of 100, with nothing in between (the send to the
-- queue is left out):
--   1. claim: the 100 oldest due rows, skipping rows another claimer locked,
--      leased for 60 s with a claim token, and their payloads read (what a
--      message is built from); committed, as a claim must be before sending;
--   2. mark sent: message id, send time and attempt recorded on those rows
--      while they still carry the token, lease cleared, and the rows taken
--      out of unsent_transactions; committed.
-- The claim is recorded in both tables: in unsent_transactions (claimed_until,
-- due_at), which every claimer scans in due order (without it the row is due
-- again at once and sent twice), and in transactions (claimed_until,
-- claim_token), the lease and the fence the schema defines there.
--
-- Run with -M prepared (or extended): the ids of a claim travel to the mark
-- as one array parameter (a simple-protocol run substitutes them as bare
-- text, which is not SQL). Unqualified names: set the schema and skip the
-- triggers the relay's own connections skip (the statements keep
-- unsent_transactions in step themselves, as the relay does), e.g.
--   PGOPTIONS='-c search_path=claimmark -c txrelay.relay_writes=on' \
--     pgbench -n -M prepared -c 4 -j 2 -t 130 -f bench/claim_mark.sql URL
-- Rows drained per script run = 100 while rows remain; a run past the end
-- claims nothing and marks nothing.
-- (No colon before a word anywhere but the pgbench variables.)
\set token random(1, 1000000000000)
WITH candidates AS MATERIALIZED (
    SELECT id FROM unsent_transactions WHERE due_at <= now() ORDER BY due_at, id LIMIT 100 FOR UPDATE SKIP LOCKED),
leased AS (
    UPDATE unsent_transactions SET claimed_until = now() + interval '60 seconds', due_at = now() + interval '60 seconds'
    WHERE id = ANY (ARRAY(SELECT id FROM candidates))),
claimed AS (
    UPDATE transactions SET claimed_until = now() + interval '60 seconds', claim_token = :token,
        updated_at = clock_timestamp()
    WHERE id = ANY (ARRAY(SELECT id FROM candidates)) AND message_id IS NULL AND failed_at IS NULL
    RETURNING id, payload)
SELECT coalesce(array_agg(id), '{}') AS ids, count(*) AS claimed,
    coalesce(sum(octet_length(CAST(payload AS text))), 0) AS payload_bytes
FROM claimed \gset
WITH sent AS (
    UPDATE transactions SET message_id = 'bench-' || id, queue_sent_at = now(), attempts = attempts + 1,
        claimed_until = NULL, claim_token = NULL, updated_at = clock_timestamp()
    WHERE id = ANY (CAST(:ids AS bigint[])) AND claim_token = :token AND message_id IS NULL
    RETURNING id)
DELETE FROM unsent_transactions WHERE id = ANY (ARRAY(SELECT id FROM sent));
