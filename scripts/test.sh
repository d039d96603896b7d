#!/bin/bash
# The README's test command: set up, lint, type-check, then every test layer
# (unit, pipeline on a dummy-datapath ovs-vswitchd, network namespaces with the userspace datapath).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check src tests benchmarks
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest -p no:cacheprovider --durations=25 "$@"
