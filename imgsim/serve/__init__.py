"""Serving: the model server's core (settings, the live bundle, request handling), the search page and the client.
Imports neither torch nor MLflow when imported: the serving image has neither (docs/architecture.md)."""
