"""gunicorn settings for the backend: `gunicorn -c gunicorn.conf.py _wsgi:app` (-b HOST:PORT to change the bind).

Workers are separate processes, each loading the model once (~0.5 GB RSS each with 1920x1080 inputs) and
sharing parsings through the Redis cache; threads serve concurrent requests inside a worker (Label Studio's
/health and /setup stay answered while a long /predict runs). The app is NOT preloaded in the master:
forking after PyTorch has run would hand workers a copy of its thread pools in an undefined state.
"""
from backend.settings import get_settings

_settings = get_settings()

bind = "0.0.0.0:9090"
workers = max(1, _settings.gunicorn_workers)
threads = max(1, _settings.gunicorn_threads)
worker_class = "gthread"
# Covers a worker's model load and the longest /predict (Label Studio itself gives up after ~90 s).
timeout = max(30, _settings.gunicorn_timeout)
graceful_timeout = 30
preload_app = False
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()


def on_starting(server):
    """Download the model once, in the master, so N workers do not race for the same hub download."""
    from backend.engine.source import resolve

    source = resolve(_settings.model, revision=_settings.model_revision, cache_dir=_settings.model_cache_dir)
    server.log.info("model folder: %s", source.path)
