"""Shared test infrastructure: real servers (Redis, Label Studio, the backend), free ports, random-weight models,
sample images, the browser, the official-pipeline reference. Tests, tools and benchmarks import it; nothing in
backend/ does."""
