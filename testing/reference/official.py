"""Product-venv side of the reference harness: find the reference venv, run run_official.py in it, cache results.

The official pipeline never runs in the product's process (it needs mmcv, torchvision and modelscope's model
code): it runs as a subprocess of the reference venv built by testing/reference/setup_env.sh.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "run_official.py"


class ReferenceEnvMissing(RuntimeError):
    """The reference venv is not built: `make ref-env` (testing/reference/setup_env.sh) builds it."""


def cache_root() -> Path:
    return Path(os.environ.get("M2FP_CACHE", Path.home() / ".cache" / "m2fp-prelabel")).expanduser()


def ref_python() -> Path:
    venv = Path(os.environ.get("REF_VENV", cache_root() / "ref-venv")).expanduser()
    py = venv / "bin" / "python"
    if not py.exists():
        raise ReferenceEnvMissing(f"no reference venv at {venv}: run `make ref-env` "
                                  "(bash testing/reference/setup_env.sh) first")
    return py


def file_digest(path: Path) -> str:
    """sha256 of a file; big ones memoised on (path, size, mtime) so a 250 MB checkpoint is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    if st.st_size < (16 << 20):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    memo = cache_root() / "digests" / hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    if memo.exists():
        return memo.read_text()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(h.hexdigest())
    return h.hexdigest()


def model_digest(model_dir: Path) -> str:
    return hashlib.sha256("".join(file_digest(p) for p in sorted(Path(model_dir).iterdir())
                                  if p.is_file()).encode()).hexdigest()


def run_official(model_dir: Path, images: list[Path], out: Path, *, threads: int = 2, warmup: int = 0,
                 repeat: int = 1, env: dict[str, str] | None = None, timeout: float = 1800) -> Path:
    """Run the official pipeline in the reference venv; raises CalledProcessError with its stderr on failure."""
    cmd = [str(ref_python()), str(HARNESS), "--model", str(model_dir), "--out", str(out), "--threads",
           str(threads), "--warmup", str(warmup), "--repeat", str(repeat), *map(str, images)]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full_env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    full_env.update(env or {})
    subprocess.run(cmd, check=True, env=full_env, capture_output=True, text=True, timeout=timeout)
    return Path(out)


def run_official_cached(model_dir: Path, images: list[Path], threads: int = 2) -> Path:
    """The official outputs for (model folder, images), computed once per content under $M2FP_CACHE/reference/."""
    h = hashlib.sha256()
    h.update(model_digest(model_dir).encode())
    h.update(hashlib.sha256(HARNESS.read_bytes()).digest())
    # The reference env's recipe (package versions) is part of what produced the outputs.
    h.update(hashlib.sha256((HERE / "setup_env.sh").read_bytes()).digest())
    for img in images:
        h.update(file_digest(img).encode())
    out = cache_root() / "reference" / f"{h.hexdigest()[:24]}.npz"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}.npz")
    try:
        run_official(model_dir, images, tmp, threads=threads)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"official pipeline harness failed:\n{exc.stderr[-4000:]}") from exc
    shutil.move(str(tmp), out)
    return out
