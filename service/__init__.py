"""fleet-payouts: pays taxi fleet companies the money they have earned, exactly once."""
