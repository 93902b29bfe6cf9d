#!/usr/bin/env bash
# scripts/reproduce.sh TARGET [--data DATA_BIN] [--seeds 1-3] [--out DIR] [--only train] [--dry-run] [fairseq flags]
# TARGET: iwslt14-de-en, iwslt17-fr-en, multi30k-de-en, multi30k-fr-en, multi30k-cpu-de-en,
# multi30k-cpu-fr-en (or de-en, fr-en). CE and EL for every seed, averaging, evaluation of every
# test subset, report (OUT/RESULTS.md, results.json, plots). Resumable.
set -euo pipefail
source "$(dirname "$0")/_python.sh"
exec "$PY" -m el_fairseq.pipeline.reproduce "$@"
