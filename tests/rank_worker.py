"""A long-lived rank for multi-process tests: runs one ringada job after another, so ranks start once.

Jobs arrive as files ``job-<k>.json`` ({"config": path, "port": int}, optionally "generate": arguments of
``ringada.generate.generate``) in the pool directory; the worker runs ``ringada.launch.train`` (or generate)
with RANK/WORLD_SIZE/MASTER_* set for that job and answers ``done-<k>-<rank>.json`` with "ok" or the
traceback. ``stop`` in the directory ends it.
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path


def main(directory: str, rank: int, world_size: int) -> None:
    root = Path(directory)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1"})
    import torch

    torch.set_num_threads(1)
    from ringada.cli import setup_logging
    from ringada.config import load
    from ringada.launch import train

    setup_logging(rank, "WARNING")
    k = 0
    while not (root / "stop").exists():
        job = root / f"job-{k}.json"
        if not job.exists():
            time.sleep(0.02)
            continue
        spec = json.loads(job.read_text())
        os.environ["MASTER_PORT"] = str(spec["port"])
        try:
            if "generate" in spec:  # {"adapter", "prompts", "options", "out"}
                from ringada.generate import GenerateOptions, generate

                g = spec["generate"]
                generate(load(spec["config"]), g["adapter"], g["prompts"] if rank == 0 else None,
                         GenerateOptions(**g.get("options", {})), g.get("out"))
            else:
                train(load(spec["config"]))
            answer = {"status": "ok"}
        except BaseException:  # noqa: BLE001 - the test process reports it
            answer = {"status": "error", "traceback": traceback.format_exc()}
        tmp = root / f"done-{k}-{rank}.tmp"
        tmp.write_text(json.dumps(answer))
        tmp.replace(root / f"done-{k}-{rank}.json")
        k += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
