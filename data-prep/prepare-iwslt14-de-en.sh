#!/usr/bin/env bash
# bash data-prep/prepare-iwslt14-de-en.sh --help   (python -m dataprep iwslt14; see README "Data preparation")
set -euo pipefail
source "$(dirname "$0")/../scripts/_python.sh"
export PYTHONPATH="$ROOT/data-prep:$PYTHONPATH"
exec "$PY" -m dataprep iwslt14 "$@"
