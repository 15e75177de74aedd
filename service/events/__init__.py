"""Payout events: the feed read from the outbox (sql/events.sql) and the webhook
deliveries (sql/webhooks.sql).
"""
