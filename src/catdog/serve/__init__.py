"""`catdog serve`: a FastAPI service with micro-batched inference and a drop-a-photo page.

app.py (config, lifespan, error handlers, server), batching.py (the micro-batcher), routes_predict.py,
routes_health.py (health, readiness, Prometheus metrics), observability.py (the metric objects), static/index.html.
"""
