# shellcheck shell=bash
# Shared by scripts/test.sh and scripts/serve.sh (sourced, not executed).
#
# leanserve_env: in the checkout, create or reuse .venv, install torch first (only if
# missing), then `pip install -e '.[EXTRAS]'`. The editable install is skipped when the
# packaging inputs (pyproject.toml, setup.py, proto/) and extras are unchanged since the
# last successful install; LEANSERVE_FORCE_INSTALL=1 forces it.
#
# Environment:
#   PYTHON                    interpreter used to create .venv (default: python3, needs >= 3.10)
#   LEANSERVE_EXTRAS          extras to install (default: cpu,dev; on GPU hosts use gpu,dev;
#                             never cpu and gpu together, they both provide `onnxruntime`)
#   LEANSERVE_TORCH           torch requirement installed first when torch is missing
#                             (default: torch==2.13.0)
#   LEANSERVE_INSTALL_SYSTEM  1 installs Debian `prometheus` when promtool is missing (also when CI=true)
#   LEANSERVE_FORCE_INSTALL   1 reinstalls the project even if nothing changed

LEANSERVE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$LEANSERVE_ROOT/.venv"

_leanserve_log() { echo "[leanserve] $*" >&2; }

_leanserve_install_system() {
    if command -v promtool >/dev/null 2>&1; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            _leanserve_log "error: promtool is missing and installing prometheus needs root (no sudo found)"
            return 1
        fi
    fi
    _leanserve_log "installing Debian package prometheus (for integration tests)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}

# Runs in a subshell so the caller's working directory is untouched (serve.sh passes user paths on).
leanserve_env() (
    local extras="${LEANSERVE_EXTRAS:-cpu,dev}"
    local torch_req="${LEANSERVE_TORCH:-torch==2.13.0}"
    cd "$LEANSERVE_ROOT"

    if [ ! -x "$VENV/bin/python" ]; then
        local python="${PYTHON:-python3}"
        if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            _leanserve_log "error: $python is missing or older than 3.10; set PYTHON=/path/to/python3.10+"
            return 1
        fi
        _leanserve_log "creating $VENV"
        "$python" -m venv "$VENV"
    fi
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check)

    # torch first, and only if missing: the project's range (<2.14) then keeps whatever build is
    # installed (a local CPU wheel here, a CUDA build on GPU hosts) instead of pulling a new one.
    if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("torch")' >/dev/null 2>&1; then
        _leanserve_log "installing $torch_req"
        "${pip[@]}" install -q "$torch_req"
    fi

    local stamp="$VENV/.leanserve-install" fingerprint
    fingerprint="$(
        {
            echo "extras=$extras"
            cat pyproject.toml
            if [ -f setup.py ]; then cat setup.py; fi
            if [ -d proto ]; then find proto -type f -name '*.proto' -print0 | LC_ALL=C sort -z | xargs -0r cat; fi
        } | sha256sum | cut -d' ' -f1
    )"
    if [ "${LEANSERVE_FORCE_INSTALL:-0}" = 1 ] || [ "$(cat "$stamp" 2>/dev/null)" != "$fingerprint" ] \
        || [ ! -x "$VENV/bin/leanserve" ]; then
        _leanserve_log "installing leanserve in editable mode with extras [$extras]"
        rm -f "$stamp"
        "${pip[@]}" install -q -e ".[$extras]"
        echo "$fingerprint" >"$stamp"
    fi

    if [ "${CI:-}" = true ] || [ "${LEANSERVE_INSTALL_SYSTEM:-0}" = 1 ]; then
        _leanserve_install_system
    fi
)
