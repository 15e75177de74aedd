-- The worker's round trips and the Billing budget's priorities (issue 21). Expand
-- only: the previous code's statements keep working beside it.
--
-- payouts_snapshot_order: the amount a periodic payout orders from the balance
-- snapshot the scan left on it, or NULL when the decision is not this simple one
-- (no snapshot, fee terms, already ordered, or nothing to pay): the take of a
-- payout records the order in its own statement (sql/payouts.sql, take). It is
-- service/domain.py's order_amount: all that is available, capped by max_amount
-- and the request, rounded down to the cent, only if at least the minimum (the
-- payout's own, or default_min when it has none or zero) and more than zero.
-- tests/integration/test_execution.py checks the two agree.
CREATE FUNCTION payouts_snapshot_order(p payouts, default_min numeric)
    RETURNS numeric
    LANGUAGE sql STABLE
AS $$
    SELECT CASE
               WHEN p.kind = 'periodic' AND p.ordered_at IS NULL
                    AND p.available IS NOT NULL AND p.currency IS NOT NULL
                    AND (p.fee_percent IS NULL OR p.fee_fixed IS NULL)
                    AND x.amount > 0
                    AND x.amount >= coalesce(nullif(p.min_amount, 0), default_min)
               THEN x.amount
           END
    FROM (SELECT trunc(greatest(least(p.available, p.max_amount,
                                      coalesce(p.requested_amount, p.max_amount)), 0), 2)
                     AS amount) x
$$;

-- billing_gate.reserved_until: the send slots a host with an instant (or manual)
-- payout waiting asked to keep for it (sql/billing.sql, claim_slots). Until an
-- urgent claim takes them or the clock passes them, other hosts' claims for
-- periodic calls take no slot at or before it, so a press waits for about one
-- slot, not behind every host's periodic backlog. A host that dies holding one
-- delays the others by two slots at most. The previous code's claim ignores the
-- column (it only yields priority, never budget).
ALTER TABLE billing_gate ADD COLUMN reserved_until timestamptz;
