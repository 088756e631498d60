-- W3C trace context of the request that created each row (`traceparent`,
-- `tracestate` headers of POST /new), carried to the queue with every send
-- of the row. Nullable, no default: adding them rewrites nothing.
ALTER TABLE transactions
    ADD COLUMN traceparent text CHECK (char_length(traceparent) <= 256),
    ADD COLUMN tracestate  text CHECK (char_length(tracestate) <= 512);
