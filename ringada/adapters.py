"""Trainable adapters on a cut model: peft LoRA or a bottleneck adapter, (un)frozen by block index.

Every adapter tensor is known by its key in peft's on-disk format (``base_model.model.<module>.lora_A.weight``),
so a process holding any slice of the blocks produces keys that merge into the whole model's adapter file.

Note (initialization): peft draws LoRA A matrices from the global RNG in module-creation order, which would make
the initial values depend on which blocks a process holds. :func:`reset_adapters` re-draws every tensor from a
generator seeded by (run seed, key), so every topology starts from the same adapters.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig
from .models import CutModel

BOTTLENECK_TYPE = "RINGADA_BOTTLENECK"
_BLOCK_RE = re.compile(r"\.(?:layers|h|layer)\.(\d+)\.")


class Bottleneck(nn.Module):
    """Houlsby-style adapter after a block: h + up(gelu(down(dropout(h)))); starts as the identity (up = 0)."""

    def __init__(self, hidden: int, width: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # fp32 adapter on a (possibly bf16) base: compute in the adapter's precision, add back in the base's
        x = self.dropout(hidden).to(self.down.weight.dtype)
        return hidden + self.up(nn.functional.gelu(self.down(x))).to(hidden.dtype)


def _bottleneck_hook(module: nn.Module, args, output):
    return module.bottleneck(output)


def check_target_modules(cfg: AdapterConfig, model_path: str, task: str) -> None:
    """Reject LoRA target names that match nothing in a block, before any process group exists."""
    if cfg.kind != "lora" or not cfg.target_modules:
        return
    from .config import ConfigError
    from .models import auto_class, family_for, read_config

    config = read_config(model_path)
    with torch.device("meta"):
        model = auto_class(config.model_type, task).from_config(config)
    block = family_for(config.model_type, task)(model, task).block_list()[0]
    names = {n.rsplit(".", 1)[-1] for n, m in block.named_modules() if n and len(list(m.children())) == 0}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise ConfigError(f"adapter.target_modules: {missing} match no module in a block; available: "
                          f"{', '.join(sorted(names))}")


def head_module_names(cut: CutModel) -> list[str]:
    """Task heads that train with the adapters (a classifier is new, so it always trains)."""
    if cut.family.task != "classification":
        return []
    return ["classifier"] if cut.family.name == "bert" else ["score"]


def lora_config(cfg: AdapterConfig, cut: CutModel, base_dir: str = ""):
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules or cut.family.default_targets),
                      modules_to_save=head_module_names(cut) or None, base_model_name_or_path=base_dir)


@dataclass
class AdapterParam:
    key: str  # peft on-disk key
    param: nn.Parameter
    block: int | None  # None: a task head, always trainable


@dataclass
class Adapters:
    """The trainable tensors of one process, in a fixed order (sorted by key)."""

    kind: str
    params: list[AdapterParam]
    config_json: dict = field(default_factory=dict)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {p.key: p.param.detach().clone() for p in self.params}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        mine = {p.key for p in self.params}
        missing = mine - state.keys()
        if strict and missing:
            raise KeyError(f"adapter file lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for p in self.params:
                if p.key in state:
                    p.param.copy_(state[p.key])

    def set_frontier(self, frontier: int) -> None:
        """Adapters of blocks >= frontier train; the others are frozen (heads always train)."""
        for p in self.params:
            p.param.requires_grad_(p.block is None or p.block >= frontier)

    def trainable(self) -> list[nn.Parameter]:
        return [p.param for p in self.params if p.param.requires_grad]

    def numel(self) -> int:
        return sum(p.param.numel() for p in self.params)


def _peft_key(name: str, adapter: str = "default") -> str:
    return name.replace(f".modules_to_save.{adapter}.", ".").replace(f".{adapter}.", ".")


def _block_of(key: str) -> int | None:
    m = _BLOCK_RE.search(key)
    return int(m.group(1)) if m else None


def add_adapters(cut: CutModel, cfg: AdapterConfig, seed: int, base_dir: str = "") -> Adapters:
    """Attach adapters to the blocks (and head) this process holds and initialize them from ``seed``."""
    heads = head_module_names(cut) if cut.has_head else []
    held = range(cut.lo, cut.hi)
    if cfg.kind == "lora":
        peft_cfg = lora_config(cfg, cut, base_dir)
        config_json = peft_cfg.to_dict()
        if len(held) == 0:
            # No block to wrap (peft would find no target): the head alone trains, under peft's key for it.
            for name in heads:
                cut.model.get_submodule(name).requires_grad_(True)
            named = [("base_model.model." + n, p) for n, p in cut.model.named_parameters()
                     if n.split(".")[0] in heads]
            params = sorted((AdapterParam(key, p, None) for key, p in named), key=lambda a: a.key)
            return Adapters(kind="lora", params=params, config_json=config_json)
        from peft import get_peft_model

        if not heads:
            peft_cfg.modules_to_save = None
        peft_model = get_peft_model(cut.model, peft_cfg)
        # PeftModel parameter names already start with peft's on-disk prefix "base_model.model.".
        named = [(_peft_key(n), p) for n, p in peft_model.named_parameters() if p.requires_grad]
    else:
        hidden = cut.model.config.hidden_size
        for i in held:
            block = cut.blocks[i]
            block.bottleneck = Bottleneck(hidden, cfg.r, cfg.dropout)
            block.register_forward_hook(_bottleneck_hook)
        for name in heads:
            cut.model.get_submodule(name).requires_grad_(True)
        named = [(n, p) for n, p in cut.model.named_parameters() if "bottleneck." in n or n.split(".")[0] in heads]
        config_json = {"peft_type": BOTTLENECK_TYPE, "r": cfg.r, "dropout": cfg.dropout,
                       "modules_to_save": heads or None, "base_model_name_or_path": base_dir}
    params = sorted((AdapterParam(key, p, _block_of(key)) for key, p in named), key=lambda a: a.key)
    for a in params:
        a.param.requires_grad_(True)
    adapters = Adapters(kind=cfg.kind, params=params, config_json=config_json)
    reset_adapters(adapters, seed)
    return adapters


def add_lora_sets(cut: CutModel, cfg: AdapterConfig, seed: int, sets: dict[str, tuple[int, int]],
                  base_dir: str = "") -> tuple[nn.Module, dict[str, Adapters]]:
    """Several named LoRA sets on one frozen base (the `sfl` server: one set per device, each on its own block
    range, each with the head if this process holds it). Returns the peft model (``set_adapter(name)`` picks the
    active set) and each set's tensors under the global peft keys, initialized like ``add_adapters``."""
    from peft import get_peft_model

    if cfg.kind != "lora":
        raise ValueError(f"adapter.kind: got {cfg.kind!r}; star modes train per-device LoRA sets (use lora)")
    heads = head_module_names(cut) if cut.has_head else []
    peft_model, result = None, {}
    for name, (lo, hi) in sets.items():
        peft_cfg = lora_config(cfg, cut, base_dir)
        peft_cfg.layers_to_transform = list(range(lo, hi))
        peft_cfg.modules_to_save = heads or None
        if peft_model is None:
            peft_model = get_peft_model(cut.model, peft_cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, peft_cfg)
        marker = f".{name}."
        named = [(_peft_key(n, name), p) for n, p in peft_model.named_parameters() if marker in n]
        params = sorted((AdapterParam(key, p, _block_of(key)) for key, p in named), key=lambda a: a.key)
        result[name] = Adapters(kind="lora", params=params, config_json=lora_config(cfg, cut, base_dir).to_dict())
        reset_adapters(result[name], seed)
    for adapters in result.values():
        for a in adapters.params:
            a.param.requires_grad_(True)
    return peft_model, result


def reset_adapters(adapters: Adapters, seed: int) -> None:
    """Deterministic init per tensor key: LoRA A and bottleneck down ~ kaiming-uniform(a=sqrt 5), LoRA B and
    bottleneck up = 0 (the adapter starts as the identity), heads drawn the same way as nn.Linear."""
    with torch.no_grad():
        for a in adapters.params:
            if a.block is None and ("classifier" in a.key or "score" in a.key):
                continue  # the head was initialized at load time from the run seed
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(a.key.encode())) % 2**63)
            is_bias = a.key.endswith(".bias")
            if ".lora_B." in a.key or ".up." in a.key:
                a.param.zero_()
            elif is_bias:
                a.param.zero_()
            else:
                nn.init.kaiming_uniform_(a.param, a=math.sqrt(5), generator=gen)


def save_adapters(directory: str | Path, state: dict[str, torch.Tensor], config_json: dict) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically (temp dir, then rename)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())}
    save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True, default=list))
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    return directory


def load_adapter_file(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(directory) / "adapter_model.safetensors")
