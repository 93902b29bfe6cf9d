#!/usr/bin/env bash
# scripts/evaluate.sh CHECKPOINT DATA_BIN [--subset test|test,test1|all] [--remove-bpe '@@ '|sentencepiece] [--detok moses|space] [--out DIR] [--cpu]
# fairseq-generate (beam 5), fairseq's tokenized BLEU, sacreBLEU with its signature, result.json.
set -euo pipefail
source "$(dirname "$0")/_python.sh"
exec "$PY" -m el_fairseq.pipeline.evaluate "$@"
