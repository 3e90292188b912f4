"""Failure drills: kill or freeze real ringada processes and measure what each failure costs.

    .venv/bin/python scripts/failure_drills.py --out out/drills            # SmolLM2 + Shakespeare (minutes)
    .venv/bin/python scripts/failure_drills.py --out out/drills --tiny     # a tiny random model (seconds)

Drills (each a real multi-process run on this box, processes killed by the ids this script started):

- ``ring-worker-killed``: a 4-rank ring under ``torchrun --max-restarts 1``; SIGKILL of local rank 2 after a
  step. Measures the steps lost (the step at the kill minus the step resumed after), the seconds from the kill
  until training continues, and whether the result equals an uninterrupted run bit for bit.
- ``ring-peer-silent``: a 3-rank ring whose middle rank is SIGSTOPped (its sockets stay open): seconds until the
  others stop with an error naming it (run.timeout_s bounds it).
- ``star-device-killed``: sfl with a server and 3 devices, one torchrun agent per box; device 3's agent and
  worker SIGKILLed mid-run. Measures the seconds until the server drops it, and that the run ends with exit 0.
- ``star-restart``: every process of the star SIGKILLed at once; the same command again. Measures the rounds
  lost and that the result equals an uninterrupted run bit for bit.

Writes OUT/drills.json and prints a markdown table (the README's "Failures and recovery" table comes from it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []


def env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def metrics(out: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    except (OSError, json.JSONDecodeError):
        return []


def wait_for(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic()


def kill_tree(procs) -> None:
    for p in procs:
        if p.poll() is None:
            for child in children(p.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.kill()
            p.wait(timeout=30)


def same_adapters(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def train_cmd(config: str, sets: list[str]) -> list[str]:
    return ["-m", "ringada", "train", "--config", config, *[a for s in sets for a in ("--set", s)]]


def torchrun(n: int, config: str, sets: list[str], *extra: str, log: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", *extra, *train_cmd(config, sets)]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=open(log, "w") if log else subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)


def ranks(world: int, config: str, sets: list[str], logs: Path) -> list[subprocess.Popen]:
    """Workers started as torchrun starts them (its environment), each its own process."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([sys.executable, *train_cmd(config, sets)], cwd=REPO,
                             env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                             stdout=open(logs / f"rank{r}.log", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True) for r in range(world)]


# ------------------------------------------------------------------------------------------------------ drills


def ring_worker_killed(args, out: Path) -> dict:
    sets = args.ring_sets + [f"run.checkpoint_every={args.checkpoint_every}"]
    cut, full = out / "cut", out / "full"
    proc = torchrun(4, args.ring_config, sets + [f"run.out_dir={cut}"], "--max-restarts=1", log=out / "cut.log")
    try:
        wait_for(lambda: len(metrics(cut)) >= args.kill_after, args.timeout, f"{args.kill_after} steps")
        at = len(metrics(cut))
        worker = next(p for p in children(proc.pid) if env_of(p).get("LOCAL_RANK") == "2")
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        # training continues once a step beyond the resume point is recorded again
        resumed_at = wait_for(lambda: (cut / "checkpoints").is_dir() and any(
            m["step"] >= at for m in metrics(cut)) and len(metrics(cut)) > at - args.checkpoint_every,
            args.timeout, "the restarted ring's first step")
        proc.wait(timeout=args.timeout)
    finally:
        kill_tree([proc])
    summary = json.loads((cut / "summary.json").read_text())
    result = {"drill": "ring-worker-killed", "exit_code": proc.returncode, "killed_after_step": at,
              "resumed_from_step": summary.get("resumed_from_step"),
              "steps_lost": at - summary.get("resumed_from_step", 0),
              "seconds_until_training_again": round(resumed_at - killed, 1)}
    if args.compare:
        plain = torchrun(4, args.ring_config, sets + [f"run.out_dir={full}"], log=out / "full.log")
        plain.wait(timeout=args.timeout * 3)
        result["bit_identical"] = same_adapters(cut, full) and \
            [m["loss"] for m in metrics(cut)] == [m["loss"] for m in metrics(full)]
    return result


def ring_peer_silent(args, out: Path) -> dict:
    timeout_s = args.silent_timeout
    procs = ranks(3, args.ring_config, args.ring_sets + [f"run.out_dir={out / 'run'}", f"run.timeout_s={timeout_s}",
                                                          "pipeline.partition=even", "run.steps=100000"],
                  out / "logs")
    try:
        wait_for(lambda: len(metrics(out / "run")) >= 1, args.timeout, "the first step")
        os.kill(procs[1].pid, signal.SIGSTOP)
        frozen = time.monotonic()
        for r in (0, 2):
            procs[r].wait(timeout=timeout_s * 4 + 60)
        noticed = time.monotonic() - frozen
    finally:
        kill_tree(procs)
    text = (out / "logs" / "rank0.log").read_text() + (out / "logs" / "rank2.log").read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("ringada: error")), "")
    return {"drill": "ring-peer-silent", "run.timeout_s": timeout_s, "seconds_until_survivors_stop": round(noticed, 1),
            "exit_codes": [procs[0].returncode, procs[2].returncode], "error": line[:300]}


def star_device_killed(args, out: Path) -> dict:
    run = out / "run"
    port = free_port()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=4", f"--node-rank={i}",
                                "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                                *train_cmd(args.star_config, args.star_sets + [f"run.out_dir={run}"])],
                               cwd=REPO, env={**ENV, "LOGLEVEL": "INFO"}, stdout=open(logs / f"node{i}.log", "w"),
                               stderr=subprocess.STDOUT, start_new_session=True) for i in range(4)]
    try:
        per_round = args.local_steps
        wait_for(lambda: len(metrics(run)) >= args.kill_after_rounds * per_round + 1, args.timeout,
                 "the star's rounds")
        worker = children(agents[3].pid)
        os.kill(agents[3].pid, signal.SIGKILL)
        for pid in worker:
            os.kill(pid, signal.SIGKILL)
        killed = time.time()
        wait_for(lambda: (run / "summary.json").exists(), args.timeout * 3, "the server's summary")
        ok = wait_for(lambda: all("worker group successfully finished" in (logs / f"node{i}.log").read_text()
                                  for i in range(3)), 120, "the survivors' workers") > 0
    finally:
        kill_tree(agents)
    summary = json.loads((run / "summary.json").read_text())
    lost = summary["lost_devices"].get("3", {})
    return {"drill": "star-device-killed", "lost_in_round": lost.get("round"), "lost_at_step": lost.get("step"),
            "seconds_until_server_drops_it": round(lost["time"] - killed, 2) if lost else None,
            "survivors_exit_0": ok, "rounds_completed": len(summary["rounds_log"]),
            "rounds_lost_by_survivors": 0 if len(summary["rounds_log"]) == summary["rounds"] else None}


def star_restart(args, out: Path) -> dict:
    cut, full = out / "cut", out / "full"
    sets = args.star_sets
    procs = ranks(4, args.star_config, sets + [f"run.out_dir={cut}"], out / "logs")
    try:
        wait_for(lambda: len(metrics(cut)) >= args.kill_after_rounds * args.local_steps + 1, args.timeout,
                 "the star's rounds")
        done = len(metrics(cut))
        kill_tree(procs)
        killed = time.monotonic()
    finally:
        kill_tree(procs)
    again = ranks(4, args.star_config, sets + [f"run.out_dir={cut}"], out / "logs-again")
    try:
        for p in again:
            p.wait(timeout=args.timeout * 3)
    finally:
        kill_tree(again)
    restart_s = time.monotonic() - killed
    summary = json.loads((cut / "summary.json").read_text())
    result = {"drill": "star-restart", "steps_done_at_kill": done, "resumed_from_step": summary["resumed_from_step"],
              "rounds_lost": (done - summary["resumed_from_step"]) / args.local_steps,
              "exit_codes": [p.returncode for p in again], "seconds_for_the_rest_of_the_run": round(restart_s, 1)}
    if args.compare:
        plain = ranks(4, args.star_config, sets + [f"run.out_dir={full}"], out / "logs-full")
        for p in plain:
            p.wait(timeout=args.timeout * 3)
        result["bit_identical"] = same_adapters(cut, full) and \
            [m["loss"] for m in metrics(cut)] == [m["loss"] for m in metrics(full)]
    return result


DRILLS = {"ring-worker-killed": ring_worker_killed, "ring-peer-silent": ring_peer_silent,
          "star-device-killed": star_device_killed, "star-restart": star_restart}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (drills.json, each drill's runs and logs)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model and token data (seconds)")
    p.add_argument("--drills", nargs="+", choices=list(DRILLS), default=list(DRILLS))
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the uninterrupted runs that check bit-identity (halves the time)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds any wait of the script may take")
    p.add_argument("--star-mode", choices=("sfl", "sft"), default="sfl",
                   help="the server discipline of the star drills (default sfl)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from ringada.models import save_tiny

        import random

        model = save_tiny(out / "tiny", "llama", layers=8)
        data = out / "tokens.jsonl"
        rng = random.Random(0)
        data.write_text("".join(json.dumps({"input_ids": [rng.randrange(1, 128) for _ in range(40)]}) + "\n"
                                for _ in range(200)))
        common = [f"model.path={model}", f"data.train={data}", f"data.eval={data}", "data.seq_len=16",
                  "data.batch_size=4", "run.eval_batches=1"]
        args.ring_sets = common + ["run.steps=200", "unfreeze.initial=2", "unfreeze.every=20"]
        args.star_sets = common + ["star.device_blocks=[2,3,4]", "star.rounds=40", "star.local_steps=2",
                                   "run.steps=80", "star.split=iid"]
        args.checkpoint_every, args.kill_after, args.kill_after_rounds, args.silent_timeout = 10, 25, 5, 5
    else:
        args.ring_sets = ["run.steps=6", "run.eval_batches=1"]
        args.star_sets = ["star.device_blocks=[2,4,6]", "star.rounds=4", "star.local_steps=2", "run.steps=8",
                          "run.eval_batches=1"]
        args.checkpoint_every, args.kill_after, args.kill_after_rounds, args.silent_timeout = 2, 3, 1, 60
    args.ring_config = str(REPO / "configs" / "ring_smollm2.yaml")
    args.star_config = str(REPO / "configs" / f"{args.star_mode}_smollm2.yaml")
    args.star_sets = args.star_sets + [f"pipeline.mode={args.star_mode}"]
    args.local_steps = 2
    results = []
    for name in args.drills:
        print(f"drill {name} ...", flush=True)
        (out / name).mkdir(parents=True, exist_ok=True)
        results.append({**DRILLS[name](args, out / name), "model": "tiny" if args.tiny else "smollm2"})
        print(json.dumps(results[-1]), flush=True)
        (out / "drills.json").write_text(json.dumps(results, indent=2))
    print("\n| drill | what it cost |\n|---|---|")
    for r in results:
        print(f"| {r['drill']} | " + ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("drill", "error"))
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
