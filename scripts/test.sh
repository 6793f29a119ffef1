#!/usr/bin/env bash
# Set up the environment and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${DRT_VENV:-.venv}/bin/python" -m pytest -q "$@"
