"""A random-weight model folder that reads images at a SMALL network input (short side 160 instead of 640).

Same weights as `cached_model(variant)` (a symlink, nothing copied), same output format; only
configuration.json's `min_size`/`max_size` differ, so one parse costs ~1.5 s instead of ~20 s with one thread on
the shared 2-core machine. For tests and benchmarks whose subject is the plumbing around the model (queues,
workers, Label Studio) rather than its pixels; its model version differs from the full-size one (the
configuration is part of it), so its cache entries never mix with theirs.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from testing.random_model import WEIGHTS_FILE, cached_model


def small_input_model(variant: str = "shaped", min_size: int = 160, max_size: int = 320) -> Path:
    source = cached_model(variant)
    folder = source.parent / f"{source.name}-input{min_size}x{max_size}"
    if (folder / WEIGHTS_FILE).exists() and (folder / "configuration.json").exists():
        return folder
    tmp = source.parent / f".tmp-{folder.name}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "configuration.json").read_text())
    config["model"]["min_size"] = min_size
    config["model"]["max_size"] = max_size
    (tmp / "configuration.json").write_text(json.dumps(config, indent=1))
    link = tmp / WEIGHTS_FILE
    if not link.exists():
        link.symlink_to(source / WEIGHTS_FILE)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process made it first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
