#!/usr/bin/env bash
# Set up, then run every test suite (slow ones included: they start real agents and sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The ExecuTorch runtime is optional for users; the tests exercise it.
pip install -q --disable-pip-version-check -e ".[executorch]"
python -m pytest -v -p no:cacheprovider --durations=15 "$@"
