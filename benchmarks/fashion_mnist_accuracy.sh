#!/usr/bin/env bash
# Low-precision accuracy on real data: ConvMixer-256/8 (k5, p2) trained on Fashion-MNIST with timm's train.py
# (one epoch, CPU), then top-1 of every fp32, bf16 and int8 path of optimize_for_inference on the 10,000 test
# images, calibrated on 512 training images (benchmarks/low_precision_accuracy.py).
#
#   apt-get install dataset-fashion-mnist      # Debian's copy: no download from anywhere else
#   TIMM_SCRIPTS_DIR=/path/to/pytorch-image-models bash benchmarks/fashion_mnist_accuracy.sh [WORK_DIR]
#
# bf16 is measured on the first 2,000 test images: on a CPU without native bf16 PyTorch emulates it at about a
# tenth of float32's speed. Figures and machine: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TIMM_SCRIPTS_DIR:?set TIMM_SCRIPTS_DIR to the folder of the train.py of timm}"
WORK=${1:-fashion-mnist-run}
PYTHON=${PYTHON:-.venv/bin/python}
SOURCE=/usr/share/datasets/fashion-mnist

# torchvision's FashionMNIST (timm's torch/fashion_mnist) reads the unpacked idx files from <root>/FashionMNIST/raw.
mkdir -p "$WORK/data/FashionMNIST/raw"
for file in "$SOURCE"/*-ubyte.gz; do
  target="$WORK/data/FashionMNIST/raw/$(basename "$file" .gz)"
  [ -f "$target" ] || gunzip -c "$file" > "$target"
done

DATA="--dataset torch/fashion_mnist --data-dir $WORK/data --val-split test --input-size 1 28 28 --mean 0.2860
      --std 0.3530 --crop-pct 1.0"
MODEL=convmixer_256_8_ks5_p2
if [ ! -f "$WORK/run/model_best.pth.tar" ]; then
  # shellcheck disable=SC2086
  "$PYTHON" "$TIMM_SCRIPTS_DIR/train.py" $DATA --train-split train --model $MODEL --num-classes 10 --in-chans 1 \
    --epochs 1 --batch-size 128 --opt adamw --lr 0.005 --weight-decay 0.005 --clip-grad 1.0 --smoothing 0.0 \
    --sched cosine --sched-on-updates --warmup-epochs 0 --min-lr 0 --hflip 0.5 --scale 0.75 1.0 --ratio 1.0 1.0 \
    --device cpu --workers 1 --log-interval 100 --seed 0 --output "$WORK" --experiment run
fi

ACCURACY="--model $MODEL --checkpoint $WORK/run/model_best.pth.tar --num-classes 10 --model-kwargs in_chans=1
          --batch-size 100"
# shellcheck disable=SC2086
"$PYTHON" benchmarks/low_precision_accuracy.py $ACCURACY $DATA --precisions int8 --json "$WORK/int8.json"
# shellcheck disable=SC2086
"$PYTHON" benchmarks/low_precision_accuracy.py $ACCURACY $DATA --precisions bf16 --max-images 2000 \
  --json "$WORK/bf16.json"
