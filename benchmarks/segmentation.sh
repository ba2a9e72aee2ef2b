#!/usr/bin/env bash
# The segmentation benchmark of docs/segmentation.md: an encoder pretrained with configs/cifar10.yaml against the
# same architecture from random init, UperNet against the linear head, at equal segmentation minutes on the CIFAR-10
# collages; then the attentive probe against the linear probe and k-NN of the same encoder on the held-out 5k.
#
#   benchmarks/segmentation.sh ENCODER_RUN [MINUTES] [OUT]
#   (defaults: 20 minutes per segmentation run, runs/seg-bench; THREADS=1 by default: one core per run; at 5
#   minutes of one contended core neither encoder got past ~9% mIoU, see docs/segmentation.md)
#
# Writes OUT/collages (once), OUT/{mae,random}-{upernet,linear,frozen-linear}, OUT/probe-{attentive,linear}, OUT/knn,
# and prints the paired-bootstrap differences. Each segmentation run is MINUTES of training plus the held-out scoring.
set -euo pipefail
ENC=${1:?usage: benchmarks/segmentation.sh ENCODER_RUN [MINUTES] [OUT]}
MIN=${2:-20}
OUT=${3:-runs/seg-bench}
THREADS=${THREADS:-1}
DATA=${DATA:-../shared/data/cifar10-train.tar.gz}
C=$OUT/collages
[ -f "$C/classes.txt" ] || python benchmarks/collages.py "$DATA" "$C" --train 20000 --val 2000

SEG=(--data "$C/train/images" --masks "$C/train/masks" --val-data "$C/val/images" --val-masks "$C/val/masks"
     --class-names "$C/classes.txt" --threads "$THREADS" --time-limit "$MIN" --eval-every 0)
# fine-tuned with each head (the fine-tuning recipe's short-budget lesson: the last 4 blocks, a higher lr, milder
# rescaling; docs/segmentation.md), and a dense linear probe (frozen encoder, linear head: the features alone)
FT=(${FT:---blocks 4 --base-lr 4e-3 --resize-range 1,1.5 --head-channels 128})
PROBE=(${PROBE:---frozen-encoder --lr 1e-3 --batch-size 32 --resize-range 1,1.5})
for init in mae random; do
  for head in upernet linear frozen-linear; do
    run=$OUT/$init-$head
    [ -f "$run/results.json" ] && continue
    extra=(); [ "$init" = random ] && extra=(--random-init)
    if [ "$head" = frozen-linear ]; then extra+=("${PROBE[@]}"); else extra+=("${FT[@]}"); fi
    mimkit segment --checkpoint "$ENC" --head "${head#frozen-}" "${SEG[@]}" "${extra[@]}" --output "$run" --overwrite
  done
done
for head in upernet linear frozen-linear; do
  python benchmarks/bootstrap.py "$OUT/mae-$head" "$OUT/random-$head"
done
python benchmarks/bootstrap.py "$OUT/mae-upernet" "$OUT/mae-linear"

# frozen probes of the same encoder on the fixed held-out 5k (all 45k training images)
P=(--checkpoint "$ENC" --data "$DATA" --threads "$THREADS")
[ -f "$OUT/knn/results.json" ] || mimkit knn "${P[@]}" --pool mean --output "$OUT/knn"
[ -f "$OUT/probe-linear/results.json" ] || mimkit linprobe "${P[@]}" --pool mean --lr 4 --output "$OUT/probe-linear" --overwrite
[ -f "$OUT/probe-attentive/results.json" ] || mimkit linprobe "${P[@]}" --head attentive --epochs 20 --warmup-epochs 2 \
    --batch-size 256 --output "$OUT/probe-attentive" --overwrite
for r in knn probe-linear probe-attentive; do
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'top1 %.2f top5 %.2f' % (r['top1'], r['top5']))" \
    "$OUT/$r/results.json" "$r"
done
