"""Payouts: the model (statuses, kinds, rules, fees), the store over sql/payouts.sql
and sql/periodic.sql, and the use cases: the instant press, execution, the periodic
scan, cancel, manual payouts with four eyes, returns.
"""
