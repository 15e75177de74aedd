"""What every process runs on: settings, the database pool and its named queries,
the queue's names, observability, plain values (money, timestamps), invariants.
"""
