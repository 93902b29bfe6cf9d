#!/usr/bin/env bash
# scripts/reproduce_iwslt.sh de-en|fr-en [--seeds 1-5] [--data DIR] [--out DIR] [--dry-run] [fairseq flags]
# The paper's IWSLT reproduction: scripts/reproduce.sh iwslt14-de-en / iwslt17-fr-en.
set -euo pipefail
case "${1:-}" in
  de-en|fr-en) ;;
  *) echo "usage: $0 de-en|fr-en [--seeds 1-5] [--data DIR] [--out DIR] [--dry-run]" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/reproduce.sh" "$@"
