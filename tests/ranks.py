"""A pool of started ranks that runs many ringada jobs (each a fresh process group on a loopback port)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankPool:
    def __init__(self, world_size: int, timeout_s: float = 180.0):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.dir = Path(tempfile.mkdtemp(prefix=f"ringada-pool{world_size}-"))
        self.jobs = 0
        self._start()

    def _start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.procs = [subprocess.Popen([sys.executable, "-m", "tests.rank_worker", str(self.dir), str(r),
                                        str(self.world_size)], cwd=REPO, env=env,
                                       stdout=open(self.dir / f"rank{r}.log", "w"), stderr=subprocess.STDOUT)
                      for r in range(self.world_size)]

    def run(self, cfg: dict, generate: dict | None = None) -> None:
        """Run one job on every rank (training, or ``generate``: {"adapter", "prompts", "options", "out"}); raise
        with the failing ranks' tracebacks. Never hangs past timeout_s."""
        k = self.jobs
        self.jobs += 1
        path = self.dir / f"config-{k}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        tmp = self.dir / f"job-{k}.tmp"
        spec = {"config": str(path), "port": free_port()}
        if generate is not None:
            spec["generate"] = generate
        tmp.write_text(json.dumps(spec))
        tmp.replace(self.dir / f"job-{k}.json")
        deadline = time.monotonic() + self.timeout_s
        answers: dict[int, dict] = {}
        while len(answers) < self.world_size:
            for r in range(self.world_size):
                done = self.dir / f"done-{k}-{r}.json"
                if r not in answers and done.exists():
                    answers[r] = json.loads(done.read_text())
            dead = [r for r, p in enumerate(self.procs) if p.poll() is not None and r not in answers]
            if any(a["status"] != "ok" for a in answers.values()):
                deadline = min(deadline, time.monotonic() + 10)  # peers of a failed rank may wait forever
            if dead or time.monotonic() > deadline:
                self.restart()
                raise RuntimeError(f"job {k}: ranks {sorted(set(range(self.world_size)) - set(answers))} "
                                   f"{'died' if dead else 'timed out'}; answers so far: {answers}")
            time.sleep(0.02)
        failed = {r: a["traceback"] for r, a in answers.items() if a["status"] != "ok"}
        if failed:
            raise RuntimeError("\n".join(f"--- rank {r}:\n{tb}" for r, tb in failed.items()))

    def restart(self) -> None:
        self.close()
        self.dir = Path(tempfile.mkdtemp(prefix=f"ringada-pool{self.world_size}-"))
        self.jobs = 0
        self._start()

    def close(self) -> None:
        (self.dir / "stop").touch()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
