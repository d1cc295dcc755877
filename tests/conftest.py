"""The shared fixtures live in the testing package (testing/fixtures.py), with the real servers they start."""
import os

os.environ.setdefault("M2FP_CACHE", os.path.expanduser("~/.cache/m2fp-prelabel"))

pytest_plugins = ["testing.fixtures"]
