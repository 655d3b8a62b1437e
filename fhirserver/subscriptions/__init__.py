"""Subscriptions (R4 Subscriptions Backport IG; docs/subscriptions.md): the topics this server
serves, what a Subscription must say to be accepted, the endpoint rules, the notification Bundle
and the dispatcher's state. The dispatcher itself, which reads through the access gate, is
`fhirserver/notify/`."""
