#!/usr/bin/env bash
# bash data-prep/prepare-iwslt17-fr-en.sh --help   (python -m dataprep iwslt17; see README "Data preparation")
set -euo pipefail
source "$(dirname "$0")/../scripts/_python.sh"
export PYTHONPATH="$ROOT/data-prep:$PYTHONPATH"
exec "$PY" -m dataprep iwslt17 "$@"
