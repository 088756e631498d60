-- Each claim writes a token of its own beside its lease; every later write
-- of that claim (result, failure, release) applies only while the row still
-- carries the token. A process whose lease ran out can then no longer
-- record over, or release, a claim another process took since.
-- Not indexed, so claiming stays a HOT update.
ALTER TABLE transactions ADD COLUMN claim_token bigint;
