#!/usr/bin/env bash
# Install Chimera (CPU-only torch) into .venv and run the main job on the built-in defaults.
# Usage: bash scripts/evolve.sh [chimera evolve args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
chimera evolve "$@"
