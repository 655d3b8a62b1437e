"""Application-level encryption: master key ring, envelope data keys, blind indexes.

Owns: every key and every cipher call. Nothing else touches key material.
May import: db, clock, config.
"""
