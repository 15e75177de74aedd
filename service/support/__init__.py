"""The support console's reads (sql/support.sql): the park and payout views support acts from."""
