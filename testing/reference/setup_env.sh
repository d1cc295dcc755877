#!/usr/bin/env bash
# Builds the environment of the OFFICIAL modelscope M2FP pipeline, used only as the parity/speed reference.
# It lives apart from the product's venv on purpose: mmcv-full must be compiled, and torchvision's PyPI wheel
# is a CUDA build that only imports after a workaround kept inside the harness (testing/reference/run_official.py).
#
# Idempotent: a stamp (hash of this script) in the venv says it is complete; a rerun then costs one import.
# The compiled mmcv-full wheel is kept in $M2FP_CACHE/wheels so a rebuilt venv skips the ~8 min compile.
# Env: M2FP_CACHE (default ~/.cache/m2fp-prelabel), REF_VENV (default $M2FP_CACHE/ref-venv), PYTHON, MAX_JOBS.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${M2FP_CACHE:-$HOME/.cache/m2fp-prelabel}
venv=${REF_VENV:-$cache/ref-venv}
wheels=${REF_WHEELS:-$cache/wheels}
py=${PYTHON:-python3}
stamp="$venv/.m2fp-reference-ready"
want=$(sha256sum "$0" | cut -c1-16)

smoke_test() {
  # What the harness needs, imported the way the harness imports it.
  "$venv/bin/python" - "$here" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import run_official
run_official.torchvision_import_workaround()
import mmcv._ext  # noqa: F401  (the compiled ops modelscope's ms_deform_attn imports)
import torchvision.transforms  # noqa: F401
from modelscope.pipelines.cv.image_human_parsing_pipeline import ImageHumanParsingPipeline  # noqa: F401
print("reference env imports ok")
PY
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && smoke_test >/dev/null 2>&1; then
  echo "reference env ready: $venv"; exit 0
fi
mkdir -p "$wheels" "$(dirname "$venv")"
# A venv left behind by an earlier checkout (a dangling link, or one whose python no longer runs) is rebuilt.
if [ -L "$venv" ] && [ ! -e "$venv" ]; then rm -f "$venv"; fi
if [ -e "$venv" ] && ! "$venv/bin/python" -c "" 2>/dev/null; then rm -rf "$venv"; fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# Nothing below may replace the CPU torch wheel with a CUDA build.
constraints="$venv/constraints.txt"
echo "torch==2.13.0" > "$constraints"
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.13.0
"${pip[@]}" -c "$constraints" "setuptools<81" wheel ninja numpy
pyver=$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
if ! ls "$wheels"/mmcv_full-1.7.2-"$pyver"-*.whl >/dev/null 2>&1; then
  echo "building mmcv-full 1.7.2 from source (~8 min on 2 cores)"
  tmp=$(mktemp -d "$wheels/.build-XXXXXX")
  # --no-build-isolation: the build must see this venv's torch; setuptools<81 still ships pkg_resources.
  MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" mmcv-full==1.7.2
  mv "$tmp"/mmcv_full-*.whl "$wheels"/ && rmdir "$tmp"
fi
"${pip[@]}" --no-deps "$(ls "$wheels"/mmcv_full-1.7.2-"$pyver"-*.whl | head -1)"
# mmcv-full's own runtime requirements (installed --no-deps above).
"${pip[@]}" -c "$constraints" addict packaging pillow pyyaml "yapf==0.40.1" opencv-python-headless
# torchvision --no-deps: its deps (torch, numpy, pillow) are here, and pip must not touch torch.
"${pip[@]}" --no-deps torchvision==0.28.0
# What modelscope's M2FP path imports without declaring it (see shared/notes/m2fp-facts.md).
"${pip[@]}" -c "$constraints" modelscope==1.40.2 simplejson sortedcontainers "datasets<=4.8.4" timm
smoke_test
echo "$want" > "$stamp"
echo "reference env ready: $venv"
