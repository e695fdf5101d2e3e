#!/usr/bin/env bash
# The one serve command: ./scripts/serve.sh [leanserve serve args...]
# Creates or reuses .venv, installs the project (see scripts/_env.sh), then runs `leanserve serve`.
set -euo pipefail

# shellcheck source=scripts/_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
leanserve_env

exec "$VENV/bin/leanserve" serve "$@"
