-- Holds (SPEC section 2): an admin stops a park's payouts for a while (a
-- dispute, a fraud check). While on hold, instant presses are refused and
-- the periodic scan leaves the park alone; payouts already in flight finish.
-- Expand only: v1/v2 code ignores the columns (and so the hold) until the
-- new version runs everywhere, which is what a rolling deploy means.
ALTER TABLE parks ADD COLUMN hold_reason text CHECK (length(hold_reason) BETWEEN 1 AND 500);
ALTER TABLE parks ADD COLUMN hold_since timestamptz;
ALTER TABLE parks ADD COLUMN hold_by text;
ALTER TABLE parks ADD CONSTRAINT parks_hold_is_complete CHECK (
    (hold_reason IS NULL) = (hold_since IS NULL)
);
