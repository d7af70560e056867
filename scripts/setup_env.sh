# Sourced by the entry scripts: create/activate .venv and install Chimera with a CPU-only torch.
# Installing torch first matters: a plain `torch` requirement would pull a multi-GB CUDA build.
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
source .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    # torch==2.13.0 is the CPU build our machines keep on disk. Elsewhere set TORCH_INSTALL,
    # e.g. TORCH_INSTALL="torch --index-url <PyTorch CPU wheel index>" (see README).
    python -m pip install --quiet ${TORCH_INSTALL:-torch==2.13.0}
fi
python -m pip install --quiet -e ".[test]"
