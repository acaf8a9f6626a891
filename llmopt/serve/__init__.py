"""`llmopt serve`: an OpenAI-compatible HTTP server over any engine, with continuous batching.

slots.py (the KV-cache primitive per backend) · scheduler.py (the thread that owns it) · engine.py (what
is loaded) · schemas.py (request bodies) · app.py / routes.py (HTTP) · metrics.py (Prometheus) ·
server.py (uvicorn, signals).
"""
