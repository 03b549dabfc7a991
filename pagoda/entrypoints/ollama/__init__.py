"""Ollama's API (``/api/...``) over pagoda's front door: the dialect's routes, request
models, options, errors and NDJSON streams. See docs/server.md, "Ollama API"."""
