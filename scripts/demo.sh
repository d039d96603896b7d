#!/bin/bash
# The README's demo command: set up, then run the demo (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sanderling demo "$@"
