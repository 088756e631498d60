-- Every resend by hand (retry, retry-all; CLI or HTTP) leaves one record
-- here, written before the first message goes out: who (the OS user, or the
-- admin token's fingerprint; never a token), when, which filter and exactly
-- which rows. The outcome is added when the resend ends.
CREATE TABLE resend_audit (
    id              bigserial    PRIMARY KEY,
    at              timestamptz  NOT NULL DEFAULT now(),
    actor           text         NOT NULL,
    via             text         NOT NULL,   -- cli | http
    command         text         NOT NULL,   -- retry | retry-all
    filter          jsonb        NOT NULL,
    transaction_ids bigint[]     NOT NULL,
    finished_at     timestamptz,
    succeeded       integer,
    failed          integer,
    outcome         text
);

CREATE INDEX resend_audit_at_idx ON resend_audit (at);
