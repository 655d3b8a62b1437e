"""Privacy oversight (issue 15): snooping detection over the access records and graded penalties
for the accounts it (and the consent stage's alerts) single out. docs/operations.md.

Owns: the rules and the penalty book; the scheduled run of them is fhirserver/schedule.py.
May import: consent, auth, audit, storage, search, fhir, crypto, db, clock, config.
"""
