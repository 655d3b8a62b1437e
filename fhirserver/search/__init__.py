"""Search: the SearchParameter registry, index rows extracted on write (indexer), and the query
path: parser -> compiler (planner) -> executor, with keyset cursors.

May import: fhir, crypto, db, clock, config.
"""
