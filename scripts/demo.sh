#!/usr/bin/env bash
# Set up the environment and fine-tune the real MiniLM on Rotten Tomatoes with a DRT method.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec "${DRT_VENV:-.venv}/bin/drt-peft" demo "$@"
