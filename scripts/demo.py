"""`make demo`: a 4-rank RingAda run under torchrun, fine-tuning SmolLM2-135M-Instruct on Shakespeare.

Prints per-step loss, frontier and tokens/s as it trains, then held-out perplexity before/after and where each
rank's time went (forward / backward / waiting for its neighbour), with its peak RSS and bytes on the wire.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ranks = int(os.environ.get("RINGADA_DEMO_RANKS", "4"))
    out = REPO / "out" / "demo-ring"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "ringada", "train",
           "--config", str(REPO / "configs" / "ring_smollm2.yaml"), "--set", f"run.out_dir={out}"]
    print("$", " ".join(cmd[2:]), flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    if rc:
        return rc
    s = json.loads((out / "summary.json").read_text())
    before, after = s["eval_before"], s["eval_after"]
    print()
    print(f"ring of {s['world_size']} ranks, blocks per rank {s['partition']}, {s['schedule']}, "
          f"{s['micro_batches']} micro-batches, {s['steps']} steps")
    print(f"held-out perplexity: {before['eval_ppl']:.2f} before -> {after['eval_ppl']:.2f} after "
          f"({s['tokens_per_s']:.0f} tokens/s)")
    print()
    print(f"{'rank':>4} {'blocks':>9} {'forward s':>10} {'backward s':>11} {'waiting s':>10} {'sent MB':>8} "
          f"{'recv MB':>8} {'peak RSS MiB':>13}")
    for r in s["ranks"]:
        lo, hi = r["blocks"]
        print(f"{r['rank']:>4} {f'[{lo}, {hi})':>9} {r['fwd_s']:>10.2f} {r['bwd_s']:>11.2f} {r['wait_s']:>10.2f} "
              f"{r['bytes_sent'] / 1e6:>8.1f} {r['bytes_recv'] / 1e6:>8.1f} {r['peak_rss_bytes'] / 2**20:>13.0f}")
    print(f"\nadapter (peft format): {out / 'adapter'}")
    return 0 if after["eval_ppl"] < before["eval_ppl"] else 1


if __name__ == "__main__":
    sys.exit(main())
