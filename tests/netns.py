"""Several "hosts" on one machine: network namespaces on a common switch, each with its own address, hostname and
/etc/hosts, for multi-host tests (and failure injection: kill a host, cut its link).

Layout for ``NetnsCluster(3)`` (names carry the pid and a counter, so concurrent runs do not collide):

    <tag>sw: bridge br0 with ports p1 p2 p3 (the switch; nothing lives in the root namespace)
    <tag>n1: lo, eth0 10.77.0.1/24  <->  p1        hostname host1
    <tag>n2: lo, eth0 10.77.0.2/24  <->  p2        hostname host2
    ...

Every node namespace gets ``/etc/netns/<ns>/hosts`` (``ip netns exec`` bind-mounts it over ``/etc/hosts``) naming
every host, so ``host1`` resolves to 10.77.0.1 inside each of them. A namespace has no hostname of its own (UTS
is separate from the network namespace), so commands run as ``ip netns exec NS unshare --uts sh -c 'hostname
hostN && exec ...'``. Needs root, iproute2, util-linux ``unshare`` and veth + bridge support in the kernel.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
_counter = itertools.count()


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """None when namespaces, veth pairs, a bridge and a UTS namespace can be created here; else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, /etc/netns)"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    ns = f"rprobe{os.getpid()}x{next(_counter)}"
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        _run("ip", "-n", ns, "link", "set", "va", "master", "br0")
        _run("ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", "hostname rprobe && test $(hostname) = rprobe")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot build network namespaces here: {exc}"
    finally:
        _run("ip", "netns", "del", ns, check=False)
    return None


class NetnsCluster:
    """``n`` hosts ``host1..hostn`` at ``<subnet>.1..n`` on one switch namespace. Use as a context manager (or call
    ``close()``): it deletes the namespaces and their /etc/netns dirs and kills everything still running in them.

    ``rate``, e.g. "100mbit", puts a tbf qdisc on both directions of every link (``tc`` with sch_tbf; ignored with
    a warning in ``self.notes`` when the kernel lacks it)."""

    def __init__(self, n: int, subnet: str = "10.77.0", rate: str | None = None, hostname_prefix: str = "host"):
        self.n = n
        self.tag = f"ra{os.getpid()}x{next(_counter)}"
        self.switch = f"{self.tag}sw"
        self.namespaces = [f"{self.tag}n{i + 1}" for i in range(n)]
        self.hostnames = [f"{hostname_prefix}{i + 1}" for i in range(n)]
        self.addresses = [f"{subnet}.{i + 1}" for i in range(n)]
        self.iface = "eth0"  # the node's interface name in every node namespace
        self.ports = [f"p{i + 1}" for i in range(n)]  # the switch side of each link
        self.procs: list[subprocess.Popen] = []
        self.notes: list[str] = []
        self._created: list[str] = []
        try:
            self._build(rate)
        except BaseException:
            self.close()
            raise

    # -- setup / teardown ------------------------------------------------------------------------------------------

    def _build(self, rate: str | None) -> None:
        sw = self.switch
        _run("ip", "netns", "add", sw)
        self._created.append(sw)
        _run("ip", "-n", sw, "link", "set", "lo", "up")
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        hosts = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{a} {h}\n" for a, h in zip(self.addresses, self.hostnames))
        for ns, addr, port in zip(self.namespaces, self.addresses, self.ports):
            _run("ip", "netns", "add", ns)
            self._created.append(ns)
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(hosts)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "add", self.iface, "type", "veth", "peer", "name", port, "netns", sw)
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", self.iface)
            _run("ip", "-n", ns, "link", "set", self.iface, "up")
            _run("ip", "-n", sw, "link", "set", port, "master", "br0")
            _run("ip", "-n", sw, "link", "set", port, "up")
        if rate:
            self.limit_rate(rate)
        self._wait_reachable()

    def limit_rate(self, rate: str, burst: str = "32kbit", latency: str = "50ms") -> None:
        for ns, port in zip(self.namespaces, self.ports):
            for where, dev in ((ns, self.iface), (self.switch, port)):
                r = _run("ip", "netns", "exec", where, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                         "rate", rate, "burst", burst, "latency", latency, check=False)
                if r.returncode != 0:
                    self.notes.append(f"tc tbf on {where}/{dev} unavailable: {r.stderr.strip()}")
                    return

    def _wait_reachable(self, timeout: float = 10.0) -> None:
        """Every node reaches the last one (bridge ports take a moment to forward)."""
        if shutil.which("ping") is None:
            return
        deadline = time.monotonic() + timeout
        for ns in self.namespaces[:-1]:
            while True:
                r = _run("ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", self.addresses[-1], check=False)
                if r.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ns} cannot reach {self.addresses[-1]}: {r.stdout}{r.stderr}")
                time.sleep(0.2)

    def close(self) -> None:
        for i in range(len(self.namespaces)):
            self.kill(i)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._created):
            _run("ip", "netns", "del", ns, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self._created.clear()
        try:
            NETNS_ETC.rmdir()  # only if empty (we may have created it)
        except OSError:
            pass

    def __enter__(self) -> "NetnsCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running things ------------------------------------------------------------------------------------------

    def command(self, i: int, argv: list[str]) -> list[str]:
        """argv run on host i (0-based) under its own hostname."""
        return ["ip", "netns", "exec", self.namespaces[i], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostnames[i], *argv]

    def popen(self, i: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start argv on host i in a session of its own (so kill() can take its process group)."""
        p = subprocess.Popen(self.command(i, argv), start_new_session=True, **kwargs)
        self.procs.append(p)
        return p

    def pids(self, i: int) -> list[int]:
        r = _run("ip", "netns", "pids", self.namespaces[i], check=False)
        return [int(x) for x in r.stdout.split()]

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill everything running on host i: the process groups we started there, then whatever else is left in
        its namespace (torchrun starts its workers in sessions of their own)."""
        for p in self.procs:
            if p.poll() is None and p.args[3] == self.namespaces[i]:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10.0
        seen: set[int] = set()
        while (pids := self.pids(i)) and time.monotonic() < deadline:  # until gone (SIGKILL takes a moment)
            seen.update(pids)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if sig == signal.SIGKILL:  # and until the kernel has finished them off (and init reaped them)
            while any(os.path.exists(f"/proc/{pid}") for pid in seen) and time.monotonic() < deadline:
                time.sleep(0.05)

    def set_link(self, i: int, up: bool) -> None:
        """Cut (or restore) host i's link at the switch."""
        _run("ip", "-n", self.switch, "link", "set", self.ports[i], "up" if up else "down")

    def port_bytes(self) -> list[tuple[int, int]]:
        """(bytes the switch received from host i, bytes it sent to host i) per host."""
        stats = json.loads(_run("ip", "-n", self.switch, "-j", "-s", "link", "show").stdout)
        by_name = {s["ifname"]: s["stats64"] for s in stats}
        return [(by_name[p]["rx"]["bytes"], by_name[p]["tx"]["bytes"]) for p in self.ports]
