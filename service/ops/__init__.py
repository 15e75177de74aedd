"""What operators run and watch: migrations, roles and privileges, the gauges,
housekeeping and recovery, the verdicts of checks.
"""
