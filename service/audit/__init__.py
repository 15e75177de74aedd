"""The audit log: entries written in the caller's transaction (store), and the hash
chain that proves none was changed since (chain).
"""
