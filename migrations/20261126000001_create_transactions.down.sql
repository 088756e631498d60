DROP TRIGGER IF EXISTS transactions_touch_updated_at ON transactions;
DROP TABLE IF EXISTS transactions;
DROP FUNCTION IF EXISTS transactions_touch_updated_at();
