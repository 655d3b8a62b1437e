"""fhirserver: a FHIR R4 server that encrypts, audits and enforces consent on every access."""

__version__ = "0.1.0"
