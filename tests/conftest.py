"""Shared fixtures live in tests/fixtures/, one module per real component they start or build."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("M2FP_CACHE", os.path.expanduser("~/.cache/m2fp-prelabel"))

pytest_plugins = [
    "tests.fixtures.model",
    "tests.fixtures.redis_server",
    "tests.fixtures.label_studio",
    "tests.fixtures.backend_server",
]
