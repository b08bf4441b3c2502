#!/usr/bin/env bash
# All performance benchmarks in one go (~6 minutes on 2 CPU cores), results in
# benchmarks/results/:
#   forward.json          VGG16 forward, flaxtl / flaxtl_tuned / PyTorch /
#                         Keras 3, fp32 + bf16, 224/64/32 px
#   train_step.json       train step 64x64 batch 16: freeze-8, full, frozen
#                         backbone, cached-features head
#   gpu_check_smoke.json  the accelerator check in --smoke mode (proves it
#                         runs; not a GPU number)
#   chart.png             both of the above as bar charts
#
#   bash benchmarks/run_all.sh          # everything
#   FAST=1 bash benchmarks/run_all.sh   # shorter budget (noisier), ~4 min
#
# Needs: the flaxtl venv, torch==2.13.0 (CPU), keras 3 (run on the JAX
# backend), matplotlib. Runs the sections one after the other: on 2 cores two
# heavy benchmarks at once would measure each other. Each measurement waits up
# to BENCH_QUIET_WAIT seconds for other processes to go quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
export KERAS_BACKEND=jax
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget=4
if [[ "${FAST:-0}" == "1" ]]; then budget=1.5; fi
mkdir -p benchmarks/results
start=$SECONDS

echo "== forward ($(date +%T))"
python benchmarks/forward.py --budget "$budget" 2> >(grep -v -i warning >&2)
echo "== train step ($(date +%T))"
python benchmarks/train_step.py --budget "$budget" \
  2> >(grep -v -i warning >&2)
echo "== gpu_check --smoke ($(date +%T))"
python benchmarks/gpu_check.py --smoke | tail -1
echo "== chart"
python benchmarks/chart.py
echo "done in $((SECONDS - start)) s"
