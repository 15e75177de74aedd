"""Parks: the registry's store (sql/parks.sql), support's park settings and holds,
the CSV import.
"""
