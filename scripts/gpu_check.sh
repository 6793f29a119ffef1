#!/usr/bin/env bash
# The CUDA path on a machine with one CUDA GPU, in under 8 minutes: tests/test_cuda.py, tests/test_triton.py
# (the Triton kernel compiled for the GPU), benchmarks/gpu_step.py, and examples/accelerate/train.py under the FSDP
# config on this one GPU (a tiny model). Tables and logs go to ${OUT:-outputs/gpu}:
#   environment.txt    the GPU, driver and package versions
#   tests.log          the tests' output (tests.xml: JUnit)
#   gpu_step.md        the step and kernel tables (gpu_step.json: every number; gpu_step.log: the run's output)
#   fsdp_example.log   the FSDP example's output
# Installs nothing: the GPU machine has no network. It needs a python3 whose torch sees the GPU, with transformers,
# peft, accelerate, safetensors, huggingface_hub, numba and pytest (triton for the Triton kernel); $PYTHON chooses it.
# Exits non-zero when a test or a benchmark measurement fails, or a step runs past its time limit.
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu}"
TESTS_LIMIT_S=100
BENCH_LIMIT_S=300
FSDP_LIMIT_S=60

PY=""
for candidate in "${PYTHON:-}" python3 /opt/torch/.venv/bin/python3 .venv/bin/python; do
  [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
  if "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    PY="$candidate"
    break
  fi
done
if [ -z "$PY" ]; then
  echo "error: no CUDA GPU here: no python3 with a torch that sees one (tried \$PYTHON, python3," \
    "/opt/torch/.venv/bin/python3 and .venv/bin/python). Run this on a machine with one CUDA GPU;" \
    "without one, pytest skips tests/test_cuda.py and runs tests/test_triton.py in Triton's interpreter." >&2
  exit 2
fi
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["transformers", "peft", "accelerate", "safetensors", "huggingface_hub", "numba", "numpy", "tqdm", "pytest"]
print(" ".join(name for name in need if importlib.util.find_spec(name) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "error: $PY lacks: $missing. Carry them as wheels (the device's README: pip download --no-deps" \
    "--only-binary=:all: into an ignored .whl/ folder here, then pip install --no-index --target /tmp/site" \
    "there and export PYTHONPATH=/tmp/site) and run this script again." >&2
  exit 2
fi

mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the conftest sets the interpreter only where there is no GPU: here the kernel compiles
{
  echo "python: $PY"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$PY" - <<'EOF'
import importlib.metadata as metadata

import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name()}")
for name in ("transformers", "peft", "accelerate", "triton", "pytest"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} absent")
EOF
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

start=$SECONDS
echo "== tests (at most ${TESTS_LIMIT_S} s)"
timeout "$TESTS_LIMIT_S" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_triton.py \
  --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
echo "== tests: exit $tests_rc after $((SECONDS - start)) s"

start=$SECONDS
echo "== benchmarks/gpu_step.py (at most ${BENCH_LIMIT_S} s)"
timeout "$BENCH_LIMIT_S" "$PY" benchmarks/gpu_step.py --out "$OUT/gpu_step" 2>&1 | tee "$OUT/gpu_step.log"
bench_rc=${PIPESTATUS[0]}
echo "== gpu_step: exit $bench_rc after $((SECONDS - start)) s; tables in $OUT/gpu_step.md"

start=$SECONDS
echo "== examples/accelerate/train.py under examples/accelerate/fsdp.yaml, one process (at most ${FSDP_LIMIT_S} s)"
timeout "$FSDP_LIMIT_S" "$PY" -m accelerate.commands.launch --config_file examples/accelerate/fsdp.yaml \
  --num_processes 1 examples/accelerate/train.py --tiny --steps 100 --density 0.05 --method random \
  --output-dir "$(mktemp -d)" 2>&1 | tee "$OUT/fsdp_example.log"
fsdp_rc=${PIPESTATUS[0]}
echo "== FSDP example: exit $fsdp_rc after $((SECONDS - start)) s"

[ "$tests_rc" -eq 124 ] && echo "error: the tests ran past ${TESTS_LIMIT_S} s" >&2
[ "$bench_rc" -eq 124 ] && echo "error: gpu_step.py ran past ${BENCH_LIMIT_S} s (what it finished is in $OUT/gpu_step.md)" >&2
[ "$fsdp_rc" -eq 124 ] && echo "error: the FSDP example ran past ${FSDP_LIMIT_S} s" >&2
for rc in "$tests_rc" "$bench_rc" "$fsdp_rc"; do
  [ "$rc" -ne 0 ] && exit "$rc"
done
exit 0
