"""Exchange between institutions: import, de-identification, erasure."""
