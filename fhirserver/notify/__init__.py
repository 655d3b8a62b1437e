"""The subscription dispatcher (docs/subscriptions.md): numbers the changes of the outbox for the
subscriptions whose owners may see them and delivers them, each delivery an audited disclosure."""
