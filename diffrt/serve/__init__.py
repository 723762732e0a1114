"""`diffrt serve`: the HTTP image service (OpenAI Images API, AUTOMATIC1111's API, health, Prometheus metrics) with
a bounded queue and dynamic batching, single-process (`app.py`) or scaled out on Ray Serve (`ray_app.py`).

Needs the `serve` extra (and `ray` for Ray Serve); nothing here is imported by `import diffrt`."""
