"""The one road every /fhir request travels:
authenticate -> authorize (scopes, compartment) -> consent -> execute -> audit.

Owns: parsing the interaction, the route table (routes.py), the handlers, request bodies and
response rendering. Handlers use storage and search; they never check scopes or write audit
records themselves.
May import: exchange, users, services and everything below them.
"""
