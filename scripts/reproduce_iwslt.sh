#!/usr/bin/env bash
# scripts/reproduce_iwslt.sh de-en|fr-en [--seeds 1-5] [--data DIR] [--out DIR] [--dry-run] [fairseq flags]
# Every seed for CE and EL, averaging, evaluation, report (results/<task>/RESULTS.md). Resumable.
set -euo pipefail
source "$(dirname "$0")/_python.sh"
case "${1:-}" in
  de-en|fr-en|multi30k) ;;
  *) echo "usage: $0 de-en|fr-en [--seeds 1-5] [--data DIR] [--out DIR] [--dry-run]" >&2; exit 2 ;;
esac
exec "$PY" -m el_fairseq.reproduce "$@"
