ALTER TABLE transactions DROP COLUMN claim_token;
