-- Runs once, when the postgres container initialises an empty data directory.
-- The library itself is loaded by `shared_preload_libraries=pg_stat_statements`
-- (see compose.yaml); this makes the view available in the service database:
--   SELECT calls, total_exec_time, mean_exec_time, query
--   FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 20;
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
