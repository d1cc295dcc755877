#!/usr/bin/env bash
# A real Label Studio for the end-to-end tests (testing/label_studio.py), in its OWN venv under the cache:
# it pins Django and its own label-studio-sdk/redis/rq, which must not constrain the backend's venv.
# Idempotent: a marker written after a complete install makes later runs return at once; an interrupted
# install (no marker) is redone from scratch.
set -euo pipefail
version=1.23.2
venv=${LS_VENV:-${M2FP_CACHE:-$HOME/.cache/m2fp-prelabel}/ls-venv}
marker="$venv/.installed-label-studio-$version"
if [ -f "$marker" ]; then exit 0; fi
# A venv from before the marker existed: adopt it when it already holds this version.
if ls "$venv"/lib/python3*/site-packages/label_studio-"$version".dist-info >/dev/null 2>&1 \
        && [ -x "$venv/bin/label-studio" ]; then
    touch "$marker"; exit 0
fi
rm -rf "$venv"
${PYTHON:-python3} -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "label-studio==$version"
# Loading LS's settings creates its data dir: point it at a throwaway one for this check.
check_dir=$(mktemp -d)
LABEL_STUDIO_BASE_DATA_DIR=$check_dir "$venv/bin/label-studio" --help >/dev/null
rm -rf "$check_dir"
touch "$marker"
