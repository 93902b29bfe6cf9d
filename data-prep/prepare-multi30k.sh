#!/usr/bin/env bash
# bash data-prep/prepare-multi30k.sh --help   (python -m dataprep multi30k; see README "Data preparation")
set -euo pipefail
source "$(dirname "$0")/../scripts/_python.sh"
export PYTHONPATH="$ROOT/data-prep:$PYTHONPATH"
exec "$PY" -m dataprep multi30k "$@"
