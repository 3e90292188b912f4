#!/usr/bin/env bash
# One node of a ring spread over several machines (one rank per machine by default). Run on every node with
# the same RDZV_ENDPOINT (host:port of any node) and RDZV_ID; rank order (= ring order) is assigned by torchrun.
#   NNODES=4 RDZV_ENDPOINT=10.0.0.1:29400 launch/ring_multinode.sh --set run.out_dir=out/ring4
# A failed worker anywhere restarts the ring (MAX_RESTARTS times, default 3) from the newest checkpoint, which
# the rank-0 box keeps (set run.checkpoint_every); no shared filesystem is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}"
exec .venv/bin/torchrun --nnodes "$NNODES" --nproc-per-node "${NPROC_PER_NODE:-1}" --max-restarts "${MAX_RESTARTS:-3}" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-ringada}" \
  -m ringada train --config "${CONFIG:-configs/ring_smollm2.yaml}" "$@"
