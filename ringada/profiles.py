"""Device and link profiles (YAML under configs/profiles/): compute speed, memory budgets, bandwidths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    gflops: float
    memory_mb: float


@dataclass(frozen=True)
class Profile:
    server_gflops: float
    devices: tuple[DeviceSpec, ...]
    uplink_mbps: float
    downlink_mbps: float
    latency_ms: float
    reference_gflops: float = 50.0  # the machine that measures costs; speed factor = gflops / reference

    def speed(self, gflops: float) -> float:
        return gflops / self.reference_gflops

    def device_speeds(self) -> list[float]:
        """Every device's speed factor, in order (the ranks of a ring or line profile)."""
        return [self.speed(d.gflops) for d in self.devices]

    def link_seconds(self, nbytes: float, mbps: float | None = None) -> float:
        """Latency plus serialization time of one message."""
        return self.latency_ms / 1e3 + nbytes * 8 / ((mbps or self.uplink_mbps) * 1e6)


def load_profile(path: str | Path) -> Profile:
    """Read and check a profile; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"profile: got {str(path)!r}; no such file (see configs/profiles/)")
    raw = yaml.safe_load(path.read_text()) or {}
    where = f"profile {path}"
    try:
        devices = tuple(DeviceSpec(name=str(d.get("name", f"device{i + 1}")), gflops=float(d["gflops"]),
                                   memory_mb=float(d["memory_mb"])) for i, d in enumerate(raw["devices"]))
        links = raw["links"]
        profile = Profile(server_gflops=float(raw.get("server", {}).get("gflops", raw.get("reference_gflops", 50))),
                          devices=devices, uplink_mbps=float(links["uplink_mbps"]),
                          downlink_mbps=float(links.get("downlink_mbps", links["uplink_mbps"])),
                          latency_ms=float(links.get("latency_ms", 0.0)),
                          reference_gflops=float(raw.get("reference_gflops", 50.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: missing or malformed field ({e}); expected server.gflops, devices[].gflops, "
                         "devices[].memory_mb, links.uplink_mbps, links.downlink_mbps") from None
    bad = [d.name for d in devices if d.gflops <= 0 or d.memory_mb <= 0]
    if bad or profile.server_gflops <= 0 or profile.uplink_mbps <= 0 or profile.downlink_mbps <= 0:
        raise ValueError(f"{where}: speeds, memory budgets and bandwidths must be > 0 (check {bad or 'server/links'})")
    return profile
