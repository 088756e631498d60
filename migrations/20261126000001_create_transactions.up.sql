-- The outbox: every transaction is committed here before it is sent to SQS.
-- Unqualified names: the relay sets search_path to its configured schema.
CREATE TABLE transactions (
    id                 bigserial     PRIMARY KEY,
    reference          varchar(255)  NOT NULL,
    external_reference varchar(255)  NOT NULL,
    idempotency_key    varchar(255)  NOT NULL,
    transaction_type   varchar(50)   NOT NULL,
    status             varchar(50)   NOT NULL,
    source             varchar(50)   NOT NULL,
    instruction_type   varchar(50)   NOT NULL,
    incoming_currency  varchar(10)   NOT NULL,
    outgoing_currency  varchar(10)   NOT NULL,
    value              numeric(20,6) NOT NULL,
    fee                numeric(20,6) NOT NULL,
    payer_id           varchar(255),
    payee_id           varchar(255),
    first_name         varchar(255),
    last_name          varchar(255),
    wallet_address     varchar(255)  NOT NULL,
    ip_address         varchar(45),
    message_id         varchar(255),
    queue_sent_at      timestamptz,
    created_at         timestamptz   NOT NULL DEFAULT now(),
    updated_at         timestamptz   NOT NULL DEFAULT now(),
    -- Relay bookkeeping.
    payload            json          NOT NULL,
    attempts           integer       NOT NULL DEFAULT 0,
    last_error         text,
    next_attempt_at    timestamptz   NOT NULL DEFAULT now(),
    claimed_until      timestamptz,   -- held by a process until then (claim lease)
    failed_at          timestamptz,
    CONSTRAINT transactions_reference_key UNIQUE (reference),
    CONSTRAINT transactions_external_reference_key UNIQUE (external_reference),
    CONSTRAINT transactions_idempotency_key_key UNIQUE (idempotency_key),
    CONSTRAINT transactions_value_non_negative CHECK (value >= 0),
    CONSTRAINT transactions_fee_non_negative CHECK (fee >= 0),
    CONSTRAINT transactions_attempts_non_negative CHECK (attempts >= 0),
    CONSTRAINT transactions_sent_is_not_dead_lettered CHECK (message_id IS NULL OR failed_at IS NULL)
)
-- Room on every page, so claiming a row (which changes no indexed column)
-- is a HOT update.
WITH (fillfactor = 80);

-- reference, external_reference and idempotency_key are indexed by their UNIQUE constraints.
CREATE INDEX transactions_status_idx ON transactions (status);
CREATE INDEX transactions_payer_id_idx ON transactions (payer_id);
CREATE INDEX transactions_payee_id_idx ON transactions (payee_id);
CREATE INDEX transactions_wallet_address_idx ON transactions (wallet_address);

-- "Unsent and due", in claim order.
CREATE INDEX transactions_unsent_due_idx ON transactions (next_attempt_at, id)
    WHERE message_id IS NULL AND failed_at IS NULL;
-- FIFO queues: is an older row of this wallet still unsent?
CREATE INDEX transactions_unsent_wallet_idx ON transactions (wallet_address, id)
    WHERE message_id IS NULL AND failed_at IS NULL;
CREATE INDEX transactions_dead_lettered_idx ON transactions (failed_at)
    WHERE failed_at IS NOT NULL;
-- Retention deletes sent rows by age.
CREATE INDEX transactions_sent_idx ON transactions (queue_sent_at)
    WHERE message_id IS NOT NULL;

CREATE FUNCTION transactions_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END
$$;

CREATE TRIGGER transactions_touch_updated_at
    BEFORE UPDATE ON transactions
    FOR EACH ROW EXECUTE FUNCTION transactions_touch_updated_at();
