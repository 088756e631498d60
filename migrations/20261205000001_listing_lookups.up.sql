-- Every read of `unsent_transactions` by id must use its primary key.
--
-- While an open transaction holds back VACUUM, the listing is almost all
-- dead tuples, and ANALYZE (or VACUUM) records it as holding almost no
-- rows. To the planner, a lookup by a column an index holds second then
-- costs what a lookup by its first does: about one entry either way. Both
-- indexes below held `id` second, so an id lookup could be planned on
-- either of them, which walks the whole index, dead entries included, for
-- each row looked up. It was: after an ANALYZE, recording a sent batch
-- walked `(wallet_address, id)` once per row (33,604 buffers for 31 rows,
-- 100–240 ms per statement), and the held run of the sustained bench
-- collapsed to 78–1,480 req/s for a minute (docs/benchmarks-history.md).
--
-- Each index now carries a predicate that no id lookup implies, so the
-- planner cannot use it for one: only the primary key can serve an id. The
-- predicates exclude no row (both columns are NOT NULL); the claims
-- (`due_at <= now()`) and the FIFO checks (`wallet_address = …`) imply
-- them, as a strict comparison implies IS NOT NULL.
DROP INDEX unsent_transactions_due_idx;
CREATE INDEX unsent_transactions_due_idx ON unsent_transactions (due_at, id) WHERE due_at IS NOT NULL;
DROP INDEX unsent_transactions_wallet_idx;
CREATE INDEX unsent_transactions_wallet_idx ON unsent_transactions (wallet_address, id)
    WHERE wallet_address IS NOT NULL;
