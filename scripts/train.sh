#!/usr/bin/env bash
# fairseq-train with a paper recipe:  scripts/train.sh --recipe iwslt14-de-en|iwslt17-fr-en|multi30k
#   --loss ce|el --seed N --data DIR --save-dir DIR [--precision fp16|bf16|fp32] [--cpu] [--dry-run] [fairseq flags]
set -euo pipefail
source "$(dirname "$0")/_python.sh"
exec "$PY" -m el_fairseq.pipeline.train "$@"
