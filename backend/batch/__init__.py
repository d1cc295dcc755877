"""Batch pre-labelling: the `m2fp-prelabel` CLI (folder and project modes), RQ jobs and workers, progress."""
