#!/usr/bin/env bash
# Set up, then run every test suite (slow ones included: they start real agents and sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The ExecuTorch runtime is optional for users; the tests exercise it.
pip install -q --disable-pip-version-check -e ".[executorch]"
# A full run writes about 4 GB (models, slices, checkpoints under /tmp): with less free, tests fail far from the cause.
free_gb=$(df --output=avail -BG /tmp | tail -1 | tr -dc 0-9)
echo "free disk under /tmp: ${free_gb} GB"
[ "$free_gb" -ge 8 ] || echo "warning: only ${free_gb} GB free under /tmp; a full run needs about 8 GB (free some disk)" >&2
python -m pytest -v -p no:cacheprovider --durations=15 "$@"
