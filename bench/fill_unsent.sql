-- psql: load a backlog of unsent rows fast, in one statement, into a
-- migrated schema: rows in `transactions`, due now, never claimed, and the
-- same rows in `unsent_transactions` as the relay keeps them (written here,
-- not by the per-row trigger, which this session skips as the relay does).
--   psql -v schema=claimmark -v rows=50000 -v prefix=a -f bench/fill_unsent.sql URL
-- Defaults: schema public, rows 50000, prefix fill. References, external
-- references and idempotency keys are <letter><prefix>-<n>: unique within a
-- load, and across loads of one schema when each load has its own prefix.
\set ON_ERROR_STOP on
\if :{?schema}
\else
\set schema public
\endif
\if :{?rows}
\else
\set rows 50000
\endif
\if :{?prefix}
\else
\set prefix fill
\endif
SET search_path = :"schema";
SET txrelay.relay_writes = on;
WITH loaded AS (
    INSERT INTO transactions (reference, external_reference, idempotency_key, transaction_type, status, source,
        instruction_type, incoming_currency, outgoing_currency, value, fee, payer_id, first_name, last_name,
        wallet_address, ip_address, payload, next_attempt_at)
    SELECT 'R' || n, 'E' || n, 'K' || n, 'DEPOSIT', 'PENDING_PAYER', 'ANCHOR_SOLANA', 'Transaction', 'EUR', 'EURC',
        100, 1.5, 'user-1', 'Ada', 'Lovelace', 'W' || (g % 1000), '203.0.113.7',
        ('{"meta_data":{"source":"DAPP","instruction_type":"Transaction","idempotency_key":"K' || n
         || '","ip_address":"203.0.113.7"},"payload":{"reference":"R' || n || '","external_reference":"E' || n
         || '","source":"ANCHOR_SOLANA","transaction_type":"DEPOSIT","status":"PENDING_PAYER","incoming_currency":"EUR",'
         || '"outgoing_currency":"EURC","value":"100.00","fee":"1.50","first_name":"Ada","last_name":"Lovelace",'
         || '"payer":"user-1","payee":null}}')::json,
        now()
    FROM generate_series(1, :rows) AS g, LATERAL (SELECT :'prefix' || '-' || g AS n) AS named
    RETURNING id, wallet_address, created_at, next_attempt_at)
INSERT INTO unsent_transactions (id, wallet_address, created_at, claimed_until, due_at)
SELECT id, wallet_address, created_at, NULL, next_attempt_at FROM loaded;
RESET txrelay.relay_writes;
VACUUM ANALYZE transactions, unsent_transactions;
