-- The resend audit is the record of who sent what by hand: a rollback does
-- not drop it silently. With records in it, this refuses unless the session
-- says so (`txrelay migrate --revert --drop-resend-audit` sets
-- txrelay.drop_resend_audit = on); keep a copy first.
DO $$
DECLARE
    records bigint;
BEGIN
    SELECT count(*) INTO records FROM resend_audit;
    IF records > 0 AND current_setting('txrelay.drop_resend_audit', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'resend_audit holds % records of resends by hand; reverting would drop them', records
            USING HINT = 'copy the table first, then revert with --drop-resend-audit';
    END IF;
END
$$;
DROP TABLE resend_audit;
