-- db_now --
-- The database's clock: the one every time rule is read by.
SELECT statement_timestamp() AS db_now

-- delete_old_succeeded_jobs --
-- Up to %(batch)s succeeded jobs whose last event is older than %(hours)s hours, among
-- the oldest succeeded ones (the head of the queue table by primary key: a run reads
-- what it deletes, and the few jobs still kept before it). Their procrastinate events
-- go by cascade. The status is checked again under each row's lock.
WITH head AS (
    SELECT id FROM procrastinate_jobs WHERE status = 'succeeded' ORDER BY id LIMIT %(batch)s
)
DELETE FROM procrastinate_jobs j USING head
WHERE j.id = head.id AND j.status = 'succeeded'
  AND (SELECT max(e.at) FROM procrastinate_events e WHERE e.job_id = j.id)
      < now() - make_interval(hours => %(hours)s)

-- delete_old_queue_jobs --
-- The same for one queue (through procrastinate's queue_name index), the oldest first
-- among what the index gives.
WITH head AS (
    SELECT id FROM procrastinate_jobs
    WHERE queue_name = %(queue)s AND status = 'succeeded'
    LIMIT %(batch)s
)
DELETE FROM procrastinate_jobs j USING head
WHERE j.id = head.id AND j.status = 'succeeded'
  AND (SELECT max(e.at) FROM procrastinate_events e WHERE e.job_id = j.id)
      < now() - make_interval(hours => %(hours)s)

-- delete_old_unsuccessful_jobs --
-- Up to %(batch)s failed, cancelled or aborted jobs whose last event is older than
-- %(days)s days, the oldest first (partial index job_finished_unsuccessfully,
-- migrations/0015). A job retried meanwhile is `todo` again under its lock: kept.
WITH head AS (
    SELECT id FROM procrastinate_jobs
    WHERE status IN ('failed', 'cancelled', 'aborted')
    ORDER BY id LIMIT %(batch)s
)
DELETE FROM procrastinate_jobs j USING head
WHERE j.id = head.id AND j.status IN ('failed', 'cancelled', 'aborted')
  AND (SELECT max(e.at) FROM procrastinate_events e WHERE e.job_id = j.id)
      < now() - make_interval(days => %(days)s)
