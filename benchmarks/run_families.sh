#!/usr/bin/env bash
# The architectures beyond VGG16 (benchmarks/archs.py) at 224x224, fp32, and
# the conversion of the real pretrained files, results in benchmarks/results/:
#   forward_<arch>.json     forward, batch 8: flaxtl / PyTorch / Keras 3
#   train_step_<arch>.json  train step, batch 8: freeze (a middle stage)
#                           and full fine-tune
#   depthwise.json          the depthwise layers of MobileNetV2 and
#                           EfficientNetB0 alone: XLA grouped conv, flaxtl's
#                           form, PyTorch
#   convert_time.json       python -m flaxtl.convert on the real files
#   families.json           all archs in one table (families.py)
#
#   bash benchmarks/run_families.sh                  # everything, ~1.5 h on
#                                                    # 2 busy cores
#   ARCHS="resnet50 tv_resnet50" bash benchmarks/run_families.sh
#
# Needs what run_all.sh needs, plus torchvision (pip install --no-deps
# torchvision==0.28.0). Each measurement waits up to BENCH_QUIET_WAIT seconds
# for other processes to go quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
export KERAS_BACKEND=jax
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
archs="${ARCHS:-resnet50 mobilenetv2 efficientnetb0 tv_resnet50 tv_mobilenet_v2}"
budget="${BUDGET:-4}"
start=$SECONDS
quiet() { grep -v -i warning >&2; }

for arch in $archs; do
  echo "== $arch forward ($(date +%T))"
  python benchmarks/forward.py --arch "$arch" --cases 224x8 --dtypes fp32 \
    --budget "$budget" 2> >(quiet)
  echo "== $arch train step ($(date +%T))"
  python benchmarks/train_step.py --arch "$arch" --budget "$budget" \
    2> >(quiet)
done
if [[ -z "${ARCHS:-}" ]]; then
  echo "== depthwise ($(date +%T))"
  python benchmarks/depthwise.py 2> >(quiet)
  echo "== convert time ($(date +%T))"
  python benchmarks/convert_time.py 2> >(quiet)
fi
echo "== all archs"
python benchmarks/families.py
echo "done in $((SECONDS - start)) s"
