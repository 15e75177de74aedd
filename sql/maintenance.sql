-- db_now --
-- The database's clock: the one every time rule is read by.
SELECT statement_timestamp() AS db_now
