#!/usr/bin/env bash
# scripts/evaluate.sh CHECKPOINT DATA_BIN [--subset test|test,test1|all] [--remove-bpe '@@ '|sentencepiece] [--detok moses|space] [--beam 5] [--lenpen 1] [--max-tokens 8000] [--out DIR] [--cpu]
# fairseq-generate (beam 5), fairseq's tokenized BLEU, sacreBLEU with its signature, result.json (with the
# fairseq-generate command), hyp.detok.txt (line i = sentence id i).
set -euo pipefail
source "$(dirname "$0")/_python.sh"
exec "$PY" -m el_fairseq.pipeline.evaluate "$@"
