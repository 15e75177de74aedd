-- claim_slots --
-- Hand out up to %(want)s send slots %(spacing_us)s microseconds apart,
-- none more than %(lease_us)s ahead of this database's clock, or say why not.
-- The row lock orders claims from every host; the clock is read after it is
-- taken. State 'open' or 'probe' with slots = 0: come back when first_at is
-- within the lease (and, for a claim that is not %(urgent)s, past the slot
-- reserved_until names). 'paused': until paused_until. 'probing': another
-- host's probe is out. 'probe': the breaker's cool-off is over; this one slot
-- is the probe, leased for %(probe_lease_us)s.
-- An %(urgent)s claim (a press or an approved manual payout waits in that
-- process) that gets nothing reserves the next free slot and the one after it
-- (room for an urgent claim that comes back late on a loaded host): until an
-- urgent claim gets slots, or the clock passes the reservation, claims that are
-- not urgent get no slot at or before it. reserved_until in the answer is the
-- reservation as it stood when this claim was decided.
WITH gate AS (
    SELECT * FROM billing_gate FOR UPDATE
), clocked AS (
    SELECT gate.*, clock_timestamp() AS at FROM gate
), plan AS (
    SELECT c.*,
           CASE
               WHEN c.paused_until > c.at THEN 'paused'
               WHEN c.breaker_open AND c.probe_until > c.at THEN 'probing'
               WHEN c.breaker_open THEN 'probe'
               ELSE 'open'
           END AS state,
           -- Never before now (unused slots of the past are gone), and never
           -- more than a second ahead: a clock stepped back must not stall
           -- the budget for as long as the step. Nor less than a lease and a
           -- spacing ahead, as far as a slot handed out can put it: below about
           -- 1.1 calls/s the urgent claim that gets nothing (and writes first_at
           -- back) would otherwise pull the next slot to within a second of the
           -- last one handed out.
           greatest(least(c.next_slot_at,
                          c.at + greatest(interval '1 second',
                                          (%(lease_us)s + %(spacing_us)s)
                                          * interval '1 microsecond')),
                    c.at) AS first_at
    FROM clocked c
), granted AS (
    SELECT p.*,
           CASE
               WHEN p.state NOT IN ('open', 'probe')
                    OR p.first_at > p.at + %(lease_us)s * interval '1 microsecond' THEN 0
               WHEN p.state = 'probe' THEN 1
               WHEN NOT %(urgent)s AND p.first_at <= p.reserved_until THEN 0
               ELSE least(%(want)s, 1 + floor(
                   (extract(epoch FROM p.at - p.first_at) * 1000000 + %(lease_us)s)
                   / %(spacing_us)s)::integer)
           END AS slots
    FROM plan p
), taken AS (
    UPDATE billing_gate g
    SET next_slot_at = s.first_at + s.slots * %(spacing_us)s * interval '1 microsecond',
        probe_until = CASE WHEN s.state = 'probe' AND s.slots > 0
                           THEN s.at + %(probe_lease_us)s * interval '1 microsecond'
                           ELSE g.probe_until END,
        reserved_until = CASE
            WHEN s.slots = 0
            THEN greatest(g.reserved_until, s.first_at + %(spacing_us)s * interval '1 microsecond')
            WHEN %(urgent)s THEN NULL
            ELSE g.reserved_until END,
        updated_at = s.at
    FROM granted s
    WHERE s.slots > 0 OR (%(urgent)s AND s.state = 'open')
)
SELECT extract(epoch FROM at)::float8 AS now,
       extract(epoch FROM paused_until)::float8 AS paused_until,
       extract(epoch FROM probe_until)::float8 AS probe_until,
       consecutive_failures, breaker_open, pause_reason,
       state, slots,
       extract(epoch FROM first_at)::float8 AS first_at,
       extract(epoch FROM reserved_until)::float8 AS reserved_until
FROM granted

-- gate_state --
-- The shared pause and breaker, for the gauge and the hosts that are not calling.
SELECT extract(epoch FROM clock_timestamp())::float8 AS now,
       extract(epoch FROM paused_until)::float8 AS paused_until,
       extract(epoch FROM probe_until)::float8 AS probe_until,
       consecutive_failures, breaker_open, pause_reason
FROM billing_gate

-- record_failure --
-- A transient failure (5xx, timeout, no connection). The %(threshold)s-th in a
-- row opens the breaker for %(cooloff_us)s; so does a failed probe.
UPDATE billing_gate g
SET consecutive_failures = g.consecutive_failures + 1,
    breaker_open = g.breaker_open OR g.consecutive_failures + 1 >= %(threshold)s,
    paused_until = CASE
        WHEN %(probe)s OR (NOT g.breaker_open AND g.consecutive_failures + 1 >= %(threshold)s)
        THEN greatest(g.paused_until,
                      clock_timestamp() + %(cooloff_us)s * interval '1 microsecond')
        ELSE g.paused_until END,
    pause_reason = CASE
        WHEN %(probe)s OR (NOT g.breaker_open AND g.consecutive_failures + 1 >= %(threshold)s)
        THEN 'breaker'
        ELSE g.pause_reason END,
    probe_until = CASE WHEN %(probe)s THEN NULL ELSE g.probe_until END,
    updated_at = clock_timestamp()
RETURNING extract(epoch FROM clock_timestamp())::float8 AS now,
          extract(epoch FROM paused_until)::float8 AS paused_until,
          extract(epoch FROM probe_until)::float8 AS probe_until,
          consecutive_failures, breaker_open, pause_reason

-- record_answer --
-- Billing answered (a probe's answer included): it is up, the breaker closes.
-- A cool-off still running is left to run out.
UPDATE billing_gate
SET consecutive_failures = 0, breaker_open = false, probe_until = NULL,
    updated_at = clock_timestamp()
WHERE consecutive_failures > 0 OR breaker_open
RETURNING extract(epoch FROM clock_timestamp())::float8 AS now,
          extract(epoch FROM paused_until)::float8 AS paused_until,
          extract(epoch FROM probe_until)::float8 AS probe_until,
          consecutive_failures, breaker_open, pause_reason

-- record_throttle --
-- Billing answered 429 with Retry-After: every host pauses %(pause_us)s from
-- now. Billing is up, so this also closes the breaker.
UPDATE billing_gate g
SET paused_until = greatest(g.paused_until,
                            clock_timestamp() + %(pause_us)s * interval '1 microsecond'),
    pause_reason = CASE
        WHEN clock_timestamp() + %(pause_us)s * interval '1 microsecond' > g.paused_until
        THEN 'throttled' ELSE g.pause_reason END,
    consecutive_failures = 0, breaker_open = false, probe_until = NULL,
    updated_at = clock_timestamp()
RETURNING extract(epoch FROM clock_timestamp())::float8 AS now,
          extract(epoch FROM paused_until)::float8 AS paused_until,
          extract(epoch FROM probe_until)::float8 AS probe_until,
          consecutive_failures, breaker_open, pause_reason
