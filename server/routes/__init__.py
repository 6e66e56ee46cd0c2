"""Routers: ops (health, readiness, metrics, models, OpenAPI), sessions (sessions, ingest, generate),
completions and chat (OpenAI-compatible), tokenize, demo (the playground's "Try the memory"),
playground (the page)."""
