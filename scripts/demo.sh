#!/bin/bash
# The README's demo command: set up, then bring up a 3-node lab (routed mode) with the demo
# workload, and print the pod-to-pod probe matrix. The lab stays up to explore:
#   .venv/bin/sanderling lab status | get pods | exec demo/web-0 -- ping 10.244.2.2 | down
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/sanderling lab down >/dev/null 2>&1 || true
.venv/bin/sanderling lab up --nodes 3 --demo "$@"
echo
echo "The lab is up. Try: .venv/bin/sanderling lab status; .venv/bin/sanderling lab get pods;"
echo "kubectl --kubeconfig \$(.venv/bin/sanderling lab kubeconfig) get pods -A; .venv/bin/sanderling lab down"
