-- `unsent_transactions` is a queue table: every row of `/new` is inserted
-- into it and deleted from it within seconds, so it is almost all dead
-- tuples between vacuums while holding only the few thousand rows in
-- flight. PostgreSQL's defaults vacuum a table once 20 % of its rows plus 50
-- are dead, and sleep 2 ms per 200 pages of work: for a table of 4,000 live
-- rows that meant vacuums far apart and slow, while 380,000 dead tuples
-- piled up in three minutes of load (BENCHMARKS.md). Every claim, FIFO
-- check and gauge then walked the dead index entries.
--
-- A fixed threshold instead of a fraction: the table qualifies once 1,000
-- rows are dead, however small it is, and is vacuumed with no cost delay
-- (it is small; its vacuum is quick) and analyzed as often, so the planner
-- sees a small table as small. The launcher still visits it at most once
-- per autovacuum_naptime (1 minute by default): at 2,000 rows/s it then
-- holds up to about 100,000 dead tuples between visits (BENCHMARKS.md), a
-- server setting this migration does not touch.
ALTER TABLE unsent_transactions SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 1000
);

-- Each row of `transactions` is updated once in the common case (its
-- message id recorded, milliseconds after its INSERT). At the default
-- fillfactor (100) INSERTs fill each page, so that update rarely finds room
-- beside its row and cannot be a HOT update: it adds an entry to each of
-- the table's 11 indexes, and the WAL (with full-page writes after every
-- checkpoint) grows with them. Under a held transaction, where no page can
-- be pruned, only 42 % of those updates were HOT; at 50, all of them were
-- (BENCHMARKS.md). Half of
-- each new page is kept free: a page's rows (about 800 bytes each) are
-- updated in place beside themselves, pruned or not. It applies to pages
-- written from now on; the heap takes up to twice the space it did.
ALTER TABLE transactions SET (fillfactor = 50);
