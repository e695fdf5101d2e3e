#!/usr/bin/env bash
# The one test command: ./scripts/test.sh [pytest args...]
# Creates or reuses .venv, installs the project with [cpu,dev] (see scripts/_env.sh),
# then runs ruff and pytest. Extra arguments go to pytest, e.g. ./scripts/test.sh -m "not slow".
set -euo pipefail

# shellcheck source=scripts/_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
leanserve_env
cd "$LEANSERVE_ROOT"

# Ray in tests: no auth tokens, no usage reporting.
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
# A crash (segfault) anywhere, also at interpreter exit, prints every thread's Python stack.
export PYTHONFAULTHANDLER=1

echo "[leanserve] ruff check ." >&2
"$VENV/bin/ruff" check .

rc=0
"$VENV/bin/python" -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "[leanserve] error: pytest collected no tests (exit code 5); check the test paths and -k/-m filters" >&2
    exit 1
fi
exit "$rc"
