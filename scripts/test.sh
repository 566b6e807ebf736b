#!/usr/bin/env bash
# Set up, then run every test suite (slow ones included: they start real agents and sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -v -p no:cacheprovider --durations=15 "$@"
