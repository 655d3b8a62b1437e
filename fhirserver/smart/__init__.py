"""SMART App Launch over HTTP: the OAuth authorization server (Authlib), the sign-in and approval
pages, discovery documents, EHR launch and the demo app.

May import: pipeline, bulk and everything below them.
"""
