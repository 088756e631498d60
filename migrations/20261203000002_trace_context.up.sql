-- W3C trace context of the request that created each row (`traceparent`,
-- `tracestate` headers of POST /new), carried to the queue with every send
-- of the row. Nullable, no default: adding them rewrites nothing. The length
-- checks are NOT VALID: they hold for every row written from now on (older
-- rows have none), and adding them reads no existing row under the lock.
ALTER TABLE transactions
    ADD COLUMN traceparent text,
    ADD COLUMN tracestate  text;
ALTER TABLE transactions
    ADD CONSTRAINT transactions_traceparent_length CHECK (char_length(traceparent) <= 256) NOT VALID,
    ADD CONSTRAINT transactions_tracestate_length CHECK (char_length(tracestate) <= 512) NOT VALID;
