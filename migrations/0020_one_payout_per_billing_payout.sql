-- migrate: concurrently
-- Schema v20: one Billing payout settles at most one payout of ours.
--
-- Billing's answer to POST /v1/payouts carries no key (SPEC section 4): nothing in
-- it ties the payout object to the order it answers. A gateway that answered a new
-- order with the object Billing made for an earlier payout of the same park and
-- body would have had the new payout recorded as succeeded, with no money moved
-- for it. From now on the database refuses a second payout with the same
-- billing_payout_id; the worker takes that refusal as an undecided answer (the
-- payout stays in flight and Billing is asked again), never as a success.
--
-- Built CONCURRENTLY, outside a transaction (service/ops/migrate.py): a plain
-- CREATE UNIQUE INDEX on millions of payouts holds every write to the table for the
-- whole build. Expand only: the release before never gives two payouts one Billing
-- payout, so nothing it writes is refused. Rows that already share a value, if any,
-- are records that cannot be edited: migrate keeps them out of the index, logs them
-- at error level, and the index holds for every other row (pg_indexes shows them).
CREATE UNIQUE INDEX CONCURRENTLY payouts_one_per_billing_payout
    ON payouts (billing_payout_id) WHERE billing_payout_id IS NOT NULL;
