ALTER TABLE transactions DROP COLUMN tracestate, DROP COLUMN traceparent;
