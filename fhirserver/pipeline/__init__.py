"""The one road every /fhir request travels:
authenticate -> authorize (scopes, compartment) -> consent -> execute -> audit."""
