"""SMART App Launch: authorization code flow with PKCE, refresh tokens, EHR launch, OpenID Connect."""
