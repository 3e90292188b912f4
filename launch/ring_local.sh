#!/usr/bin/env bash
# A RingAda ring of N ranks on this machine (default 4), loopback only.
#   launch/ring_local.sh [N] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-4}
shift || true
exec .venv/bin/torchrun --nproc-per-node "$N" --master-addr 127.0.0.1 --master-port "${PORT:-29400}" \
  -m ringada train --config configs/ring_smollm2.yaml "$@"
