"""Routers: ops (health, readiness, metrics, models, OpenAPI), sessions (sessions, ingest, generate),
completions (OpenAI-compatible)."""
