"""Exchange between institutions and bulk data work: `fhirserver load` (sources, worker
preparation, the checkpointed writer), de-identification, patient erasure, reindexing and the
in-process bulk loader of the benchmarks and demo.

May import: services and everything below it.
"""
