#!/usr/bin/env bash
# Install Chimera with its test extra into .venv (CPU-only torch) and run the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python -m pytest "$@"
