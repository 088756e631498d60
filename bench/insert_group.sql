-- pgbench: the INSERT of a group of 10 /new requests in one statement, the
-- database's limit for group commit. Same rows as insert.sql.
-- (No colon before a word anywhere: pgbench would read it as a variable.)
INSERT INTO pgbench_ref.transactions (reference, external_reference, idempotency_key, transaction_type, status, source,
    instruction_type, incoming_currency, outgoing_currency, value, fee, payer_id, first_name, last_name, wallet_address,
    ip_address, payload, next_attempt_at, claimed_until)
SELECT 'R' || v, 'E' || v, 'K' || v, 'DEPOSIT', 'PENDING_PAYER', 'ANCHOR_SOLANA', 'Transaction', 'EUR', 'EURC', 100.00,
    1.50, 'user-1', 'Ada', 'Lovelace', 'W' || (v % 1000), '203.0.113.7',
    CAST('{"meta_data":{"source":"DAPP","instruction_type":"Transaction","idempotency_key":"K'
     || v || '","ip_address":"203.0.113.7"},"payload":{"external_reference":"E' || v
     || '","source":"ANCHOR_SOLANA","reference":"R' || v || '","first_name":"Ada","last_name":"Lovelace","transaction_type":"DEPOSIT","status":"PENDING_PAYER","incoming_currency":"EUR","outgoing_currency":"EURC","value":"100.00","fee":"1.50","payer":"user-1","payee": null}}' AS json),
    now() + interval '5 seconds', now() + interval '5 seconds'
FROM (SELECT nextval('pgbench_ref.bench_seq') AS v FROM generate_series(1, 10)) AS n
RETURNING id;
