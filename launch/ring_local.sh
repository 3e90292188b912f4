#!/usr/bin/env bash
# A RingAda ring of N ranks on this machine (default 4), loopback only.
#   launch/ring_local.sh [N] [--set key=value ...]
# A worker that dies makes torchrun restart all of them (MAX_RESTARTS times, default 3); run.resume=auto continues
# from the newest checkpoint (set run.checkpoint_every to have one).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-4}
shift || true
exec .venv/bin/torchrun --nproc-per-node "$N" --master-addr 127.0.0.1 --master-port "${PORT:-29400}" \
  --max-restarts "${MAX_RESTARTS:-3}" \
  -m ringada train --config configs/ring_smollm2.yaml "$@"
