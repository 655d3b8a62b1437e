"""OAuth 2.0 / SMART on FHIR: clients, scopes, tokens and the authorization server (Authlib)."""
