"""The HTTP API (`fleet-payouts serve`)."""
