-- `unsent_transactions` is a queue table: every row of `/new` is inserted
-- into it and deleted from it within seconds, so it is almost all dead
-- tuples between vacuums while holding only the few thousand rows in
-- flight. PostgreSQL's defaults vacuum a table once 20 % of its rows plus 50
-- are dead, and sleep 2 ms per 200 pages of work: for a table of 4,000 live
-- rows that meant vacuums far apart and slow, while 380,000 dead tuples
-- piled up in three minutes of load (BENCHMARKS.md). Every claim, FIFO
-- check and gauge then walked the dead index entries.
--
-- A fixed threshold instead of a fraction: vacuum whenever 1,000 rows are
-- dead, however small the table, with no cost delay (the table is small;
-- its vacuum is quick), and analyze as often, so the planner sees a small
-- table as small. Insert-triggered vacuums (PostgreSQL 13+) are left at
-- their default: rows here are deleted, not frozen in place.
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
-- be pruned, only 42 % of those updates were HOT (BENCHMARKS.md). Half of
-- each new page is kept free: a page's rows (about 800 bytes each) are
-- updated in place beside themselves, pruned or not. It applies to pages
-- written from now on; the heap takes up to twice the space it did.
ALTER TABLE transactions SET (fillfactor = 50);
