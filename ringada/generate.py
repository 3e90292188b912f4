"""``ringada generate``: text generation with fine-tuned adapters across the ring that trained them.

Note (ring decoding). The ranks keep the training layout: rank 0, the initiator, holds the embedding, the final
norm and head, the sampler, and its own blocks; rank r holds blocks [lo_r, hi_r) and the KV cache of those
blocks only, never the whole model. Prompts are grouped into micro-batches (the rows of one micro-batch are
left-padded to one length, as ``generate`` pads a batch), and several micro-batches are in flight at once. A
*pass* (m, p) runs micro-batch m's new positions through every block once: p = 0 is the prefill (the whole
prompt), p >= 1 the token chosen by pass p - 1. Rank 0 starts the prefill of every micro-batch, then takes the
passes back from the closing edge round-robin: head, sampler, embedding of the chosen token, its own blocks,
send. While rank 0 works on micro-batch m, the other ranks work on m + 1, m + 2, ..., so with at least as many
micro-batches in flight as ranks, no rank waits long.

The plan (:func:`decode_plan`) is data, like the training schedule: per rank a list of F (a pass through the
rank's blocks), H (head and sampler), s/r (send/receive). It is drawn for ``max_new_tokens`` passes. A
micro-batch whose rows have all ended (an EOS token each) leaves early: rank 0 sends END in place of its next
pass, the END goes once around the ring, and every rank skips that micro-batch's later actions. One rule on
every rank keeps every channel in the order the plan gives both of its ends.

Exactness. Every block gets what ``model.generate`` gives it: the mask from the 2-D attention mask through
transformers' ``create_causal_mask``, position ids from the mask's running sum, a ``DynamicCache``; rows that
have ended are fed the pad token. Greedy decoding picks exactly the tokens of
``PeftModel.from_pretrained(...).generate(..., do_sample=False)`` (tests/test_generate.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import config as config_mod
from .comm import (ACT, ADAPTERS, END, Counters, PeerError, Placement, Wire, collective, decode_names,
                   encode_names, pack_state, start_world, unpack_state)
from .config import Config, ConfigError

log = logging.getLogger(__name__)
PROGRESS_EVERY = 50  # rank 0 logs every this many passes of a wave


# ------------------------------------------------------------------------------------------------------ the plan


class DecodeAction(NamedTuple):
    """``kind``: F (the rank's blocks), H (head + sampler), s / r (send to / receive from ``peer``)."""

    kind: str
    mb: int
    pos: int
    peer: int = -1

    def __str__(self) -> str:
        text = f"{self.kind}{self.mb}.{self.pos}"
        if self.kind == "s":
            return f"{text}>{self.peer}"
        if self.kind == "r":
            return f"{text}<{self.peer}"
        return text


@dataclass
class DecodePlan:
    world_size: int
    micro_batches: int
    passes: int  # = max_new_tokens: pass p chooses token p + 1
    actions: list[list[DecodeAction]]

    def format(self) -> str:
        return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.actions))

    def validate(self) -> None:
        """Every rank runs F once per pass in pass order; rank 0 runs H once per pass, after the pass went round;
        every channel receives exactly what it was sent, in the same order; executing the lists with blocking
        receives and non-blocking sends terminates."""
        n, expected = self.world_size, [(p, m) for p in range(self.passes) for m in range(self.micro_batches)]
        for r, acts in enumerate(self.actions):
            fs = [(a.pos, a.mb) for a in acts if a.kind == "F"]
            if sorted(fs) != expected or len(set(fs)) != len(fs):
                raise ValueError(f"rank {r}: F actions {fs[:6]}... do not cover every pass once")
            hs = [(a.pos, a.mb) for a in acts if a.kind == "H"]
            if hs != ([] if r else sorted(hs)) or (r == 0 and sorted(hs) != expected):
                raise ValueError(f"rank {r}: H actions {hs[:6]}... (rank 0 alone chooses tokens, once per pass)")
        for src in range(n):
            for dst in range(n):
                sent = [(a.mb, a.pos) for a in self.actions[src] if a.kind == "s" and a.peer == dst]
                got = [(a.mb, a.pos) for a in self.actions[dst] if a.kind == "r" and a.peer == src]
                if sent != got:
                    raise ValueError(f"channel {src}->{dst}: sent {sent[:6]}... but received {got[:6]}...")
        # run it: a receive waits for its send; sends never wait
        cursor, delivered = [0] * n, set()
        while any(c < len(a) for c, a in zip(cursor, self.actions)):
            moved = False
            for r in range(n):
                while cursor[r] < len(self.actions[r]):
                    a = self.actions[r][cursor[r]]
                    if a.kind == "r" and (a.peer, r, a.mb, a.pos) not in delivered:
                        break
                    if a.kind == "s":
                        delivered.add((r, a.peer, a.mb, a.pos))
                    cursor[r] += 1
                    moved = True
            if not moved:
                raise ValueError(f"deadlock at {[str(a[c]) for c, a in zip(cursor, self.actions) if c < len(a)]}")


def decode_plan(world_size: int, micro_batches: int, passes: int) -> DecodePlan:
    """Round-robin pipelined decoding (Note: ring decoding). One process: F and H per pass, in pass order."""
    if world_size < 1 or micro_batches < 1 or passes < 1:
        raise ValueError(f"a decode plan needs >= 1 rank, micro-batch and pass; got {world_size}, {micro_batches}, "
                         f"{passes}")
    order = [(m, p) for p in range(passes) for m in range(micro_batches)]
    if world_size == 1:
        return DecodePlan(1, micro_batches, passes, [[a for m, p in order
                                                      for a in (DecodeAction("F", m, p), DecodeAction("H", m, p))]])
    last = world_size - 1
    lead = [a for m in range(micro_batches) for a in (DecodeAction("F", m, 0), DecodeAction("s", m, 0, 1))]
    for m, p in order:
        lead += [DecodeAction("r", m, p, last), DecodeAction("H", m, p)]
        if p + 1 < passes:
            lead += [DecodeAction("F", m, p + 1), DecodeAction("s", m, p + 1, 1)]
    actions = [lead]
    for r in range(1, world_size):
        actions.append([a for m, p in order for a in (DecodeAction("r", m, p, r - 1), DecodeAction("F", m, p),
                                                      DecodeAction("s", m, p, (r + 1) % world_size))])
    return DecodePlan(world_size, micro_batches, passes, actions)


# --------------------------------------------------------------------------------------------------- options


@dataclass(frozen=True, kw_only=True)
class GenerateOptions:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    batch_size: int = 1  # prompts per micro-batch
    in_flight: int = 0  # micro-batches in flight at once (0: as many as ranks)

    def check(self) -> None:
        problems = [
            (self.max_new_tokens >= 1, f"--max-new-tokens: got {self.max_new_tokens}; expected >= 1"),
            (self.temperature >= 0, f"--temperature: got {self.temperature}; expected 0 (greedy) or > 0"),
            (self.top_k >= 0, f"--top-k: got {self.top_k}; expected >= 0 (0: off)"),
            (0 < self.top_p <= 1, f"--top-p: got {self.top_p}; expected a probability in (0, 1]"),
            (self.batch_size >= 1, f"--batch-size: got {self.batch_size}; expected >= 1"),
            (self.in_flight >= 0, f"--in-flight: got {self.in_flight}; expected >= 0 (0: as many as ranks)"),
        ]
        for ok, text in problems:
            if not ok:
                raise ConfigError(text)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def read_prompts(texts: list[str], path: str | None) -> list[str | list[int]]:
    """``--prompt`` texts, then ``--prompts FILE``: .txt one prompt per line (blank lines skipped), or .jsonl
    with ``text`` or pre-tokenized ``input_ids`` per line."""
    prompts: list[str | list[int]] = list(texts)
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"--prompts: got {path!r}; no such file")
        if file.suffix == ".jsonl":
            from .data import read_jsonl

            try:
                rows = read_jsonl(file, "--prompts")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            for n, row in enumerate(rows, 1):
                if isinstance(row.get("text"), str):
                    prompts.append(row["text"])
                elif isinstance(row.get("input_ids"), list) and row["input_ids"]:
                    prompts.append([int(t) for t in row["input_ids"]])
                else:
                    raise ConfigError(f"--prompts: {path}: row {n} has neither a 'text' string nor a non-empty "
                                      "'input_ids' list")
        else:
            prompts += [line for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE (.txt or .jsonl)")
    return prompts


def tokenize(prompts: list[str | list[int]], tokenizer, vocab_size: int) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ConfigError("model.path: this model directory has no tokenizer; give prompts as token ids "
                                  "(--prompts FILE.jsonl with 'input_ids' per line)")
            ids = tokenizer(p)["input_ids"]
        else:
            ids = list(p)
        if not ids:
            raise ConfigError(f"prompt {i}: {p!r} has no tokens")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ConfigError(f"prompt {i}: token id {bad[0]} outside the model's vocabulary [0, {vocab_size})")
        out.append(ids)
    return out


# --------------------------------------------------------------------------------------------- the sampler


def special_tokens(model_dir: Path) -> tuple[list[int], int]:
    """(EOS ids, pad id) the way ``generate`` finds them: generation_config.json, else the model config; the pad
    falls back to the first EOS, as ``generate`` does."""
    from transformers import AutoConfig, GenerationConfig

    if (model_dir / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(model_dir)
    else:
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    eos = gen.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)
    return eos, int(pad)


def row_generator(seed: int, prompt_index: int) -> torch.Generator:
    """Sampling RNG of one prompt: its draws do not depend on batching, micro-batches or world size."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{prompt_index}".encode()))


def choose(logits: torch.Tensor, opts: GenerateOptions, generators: list[torch.Generator]) -> torch.Tensor:
    """Next token per row from fp32 logits [B, V]: argmax, or temperature / top-k / top-p sampling (applied in
    that order, as transformers' warpers do)."""
    if opts.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float().cpu() / opts.temperature
    if opts.top_k:
        kth = torch.topk(scores, min(opts.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if opts.top_p < 1:
        sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - opts.top_p
        drop[:, -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    picks = [torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)]
    return torch.cat(picks).to(logits.device)


# ---------------------------------------------------------------------------------------------- the runtime


@dataclass
class Flight:
    """One micro-batch in flight on one rank: its KV cache, its 2-D mask, and (rank 0) its tokens."""

    cache: object
    mask: torch.Tensor | None = None  # [B, cached + new] int64
    ended_at: int | None = None  # the pass END replaced
    hidden: torch.Tensor | None = None  # received, or this rank's output waiting to be sent
    # rank 0 only
    rows: list[int] = field(default_factory=list)  # prompt indices
    ids: torch.Tensor | None = None  # [B, len] left-padded prompt
    last: torch.Tensor | None = None  # [B, 1] the tokens chosen last
    unfinished: torch.Tensor | None = None  # [B] bool
    tokens: list[list[int]] = field(default_factory=list)
    generators: list[torch.Generator] = field(default_factory=list)


class RingDecoder:
    """One rank's slice of the model with its adapters, and the executor of decode plans."""

    def __init__(self, cfg: Config, topo, place: Placement, wire: Wire | None, eos: list[int], pad: int):
        from .adapters import add_adapters
        from .models import load_model, resolve_model_dir
        from .runtime import base_dtype
        from .train import set_adapter_dropout

        self.cfg, self.topo, self.device, self.wire = cfg, topo, place.device, wire
        self.cut = load_model(cfg.model.path, "causal_lm", blocks=topo.blocks, embed=topo.is_initiator,
                              head=topo.is_initiator, seed=cfg.run.seed, dtype=base_dtype(cfg))
        self.adapters = add_adapters(self.cut, cfg.adapter, cfg.run.seed, base_dir=str(resolve_model_dir(
            cfg.model.path)))
        set_adapter_dropout(self.cut.model, False)
        self.cut.model.to(self.device)
        self.eos = torch.tensor(eos, dtype=torch.int64, device=self.device)
        self.pad = pad
        self.compute_s = 0.0
        self.kv_peak_bytes = 0
        self.model_bytes = sum(t.numel() * t.element_size() for t in
                               [*self.cut.model.parameters(), *self.cut.model.buffers()])

    # -- one wave of micro-batches
    def run(self, plan: DecodePlan, prompts: list[list[list[int]]] | None, rows: list[list[int]] | None,
            opts: GenerateOptions, timing: dict) -> list[Flight]:
        """Execute this rank's list of ``plan``. Rank 0 passes the micro-batches' prompts (token ids) and their
        prompt indices; returns the flights (rank 0: with their tokens)."""
        from transformers import DynamicCache

        rank, wire, cut = self.topo.rank, self.wire, self.cut
        lo, hi = self.topo.blocks
        flights = [Flight(cache=DynamicCache(config=cut.model.config)) for _ in range(plan.micro_batches)]
        if self.topo.is_initiator:
            for f, batch, idx in zip(flights, prompts, rows):
                width = max(len(p) for p in batch)
                f.ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in batch], device=self.device)
                f.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device)
                f.rows, f.tokens = idx, [[] for _ in batch]
                f.unfinished = torch.ones(len(batch), dtype=torch.bool, device=self.device)
                f.generators = [row_generator(opts.seed, i) for i in idx]
        first_tokens = 0
        for a in plan.actions[rank]:
            f = flights[a.mb]
            if f.ended_at is not None and a.pos > f.ended_at:
                continue  # the micro-batch has left
            ending = f.ended_at == a.pos
            try:
                if a.kind == "r":
                    kind, tensors = wire.recv_either(a.peer, (ACT, END), a.pos, a.mb)
                    # pass p of this micro-batch started only once pass p - 1 had gone through every rank, so
                    # what this rank sent of its earlier passes was taken: free those buffers as it goes
                    wire.release(a.mb, a.pos)
                    if kind == END:
                        f.ended_at, f.cache = a.pos, None
                    else:
                        f.hidden = tensors[0]
                        if len(tensors) > 1:
                            f.mask = tensors[1]
                elif a.kind == "s":
                    if ending:
                        wire.send(a.peer, END, a.pos, a.mb, [])
                        f.cache = None
                    else:
                        # the mask travels with the prefill (rank 0 has its own)
                        first = a.pos == 0 and a.peer != 0
                        wire.send(a.peer, ACT, a.pos, a.mb, [f.hidden, f.mask] if first else [f.hidden])
                        f.hidden = None
                elif ending:
                    continue
                elif a.kind == "F":
                    t0 = time.perf_counter()
                    self._forward(f, a.pos, lo, hi)
                    self.compute_s += time.perf_counter() - t0
                    self.kv_peak_bytes = max(self.kv_peak_bytes, sum(_cache_bytes(g.cache) for g in flights))
                elif a.kind == "H":
                    t0 = time.perf_counter()
                    self._choose(f, a.pos, plan.passes, opts)
                    self.compute_s += time.perf_counter() - t0
                    if a.pos == 0:
                        first_tokens += 1
                        if first_tokens == plan.micro_batches:
                            timing["prefill_done"] = time.perf_counter()
                    if a.mb == plan.micro_batches - 1 and (a.pos + 1) % PROGRESS_EVERY == 0:
                        log.info("pass %d/%d", a.pos + 1, plan.passes)
            except PeerError as e:  # already names rank, peer and pass: add the plan's action
                e.args = (f"{e} [decode action {a}]",)
                raise
            except Exception as e:
                raise RuntimeError(f"[rank {rank} decoding pass {a.pos} mb {a.mb} action {a}] {e}") from e
        if wire is not None:
            wire.flush()
        return flights

    def _forward(self, f: Flight, pos: int, lo: int, hi: int) -> None:
        cut = self.cut
        if pos > 0:
            f.mask = torch.cat([f.mask, f.mask.new_ones(f.mask.shape[0], 1)], dim=1)
        new = f.ids.shape[1] if self.topo.is_initiator and pos == 0 else (1 if pos else f.hidden.shape[1])
        # positions as generate counts them: the running sum of the mask (padding at 0)
        position_ids = (f.mask.cumsum(-1) - 1).masked_fill(f.mask == 0, 0)[:, -new:]
        with torch.no_grad():
            if self.topo.is_initiator:
                hidden = cut.family.embed_at(f.ids if pos == 0 else f.last, position_ids)
            else:
                hidden = f.hidden
            if hi > lo:
                ctx = cut.family.cached_context(hidden, f.mask, position_ids, f.cache, lo)
                for i in range(lo, hi):
                    hidden = cut.run_block(i, hidden, ctx)
        f.hidden = hidden

    def _choose(self, f: Flight, pos: int, passes: int, opts: GenerateOptions) -> None:
        with torch.no_grad():
            logits = self.cut.head(f.hidden[:, -1:], None)[:, -1].float()
        f.hidden = None
        chosen = choose(logits, opts, f.generators)
        chosen = torch.where(f.unfinished, chosen, torch.full_like(chosen, self.pad))
        for b, t in enumerate(chosen.tolist()):
            if f.unfinished[b]:
                f.tokens[b].append(t)
        if self.eos.numel():
            f.unfinished &= ~torch.isin(chosen, self.eos)
        f.last = chosen[:, None]
        if pos + 1 < passes and not bool(f.unfinished.any()):
            f.ended_at = pos + 1  # END goes around in place of the next pass
        if pos + 1 == passes:
            f.cache = None


def _cache_bytes(cache) -> int:
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------------------ the job


def _ring_config(cfg: Config, world_size: int) -> Config:
    """The training config as a decoding ring: same model, adapter and partition; a star's or a line's run
    decodes on the ring layout (rank 0 holds embedding and head)."""
    mode = "single" if world_size == 1 else "ring"
    part = cfg.pipeline.partition
    if cfg.pipeline.mode in ("sfl", "sft") or (isinstance(part, list) and len(part) != world_size):
        part = "even"
    return replace(cfg, pipeline=replace(cfg.pipeline, mode=mode, partition=part, emulate=False),
                   star=config_mod.StarConfig(), compress=config_mod.CompressConfig())


def check_adapter(cfg: Config, adapter_dir: Path) -> None:
    """The adapter directory exists and was trained with this config's adapter settings (else its LoRA scale
    or shapes would be wrong)."""
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ConfigError(f"--adapter: got {str(adapter_dir)!r}; expected a directory with adapter_model.safetensors"
                          " (a run's out_dir/adapter, or a star round's directory)")
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    a = cfg.adapter
    if a.kind == "lora":
        checks = [("r", a.r, saved.get("r")), ("alpha", a.alpha, saved.get("lora_alpha"))]
        if a.target_modules:
            checks.append(("target_modules", sorted(a.target_modules), sorted(saved.get("target_modules") or [])))
        if saved.get("peft_type") not in (None, "LORA"):
            checks.append(("kind", a.kind, saved.get("peft_type")))
    else:
        checks = [("r", a.r, saved.get("r"))]
    for key, mine, theirs in checks:
        if theirs is not None and mine != theirs:
            raise ConfigError(f"adapter.{key}: the config says {mine!r} but {adapter_dir} was trained with "
                              f"{theirs!r}; pass that run's config.yaml or --set adapter.{key}=...")


def generate(cfg: Config, adapter_dir: str | Path, prompts: list[str | list[int]] | None,
             opts: GenerateOptions = GenerateOptions(), out: str | Path | None = None,
             echo: bool = False) -> dict | None:
    """Generate completions of ``prompts`` (rank 0's; other ranks pass None) with the adapter in ``adapter_dir``
    on the world torchrun gave (or one process). Returns the summary on rank 0 (with ``completions``)."""
    from .launch import placement, world_from_env
    from .models import load_tokenizer, read_config, resolve_model_dir
    from .partition import PLANNED
    from .runtime import gather_rank_rows, make_topology

    rank, world_size = world_from_env()
    if cfg.model.task != "causal_lm":
        raise ConfigError(f"model.task: got {cfg.model.task!r}; generate needs a causal_lm")
    opts.check()
    cfg = _ring_config(cfg, world_size)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    planned = cfg.pipeline.partition in PLANNED and world_size > 1  # rank 0 plans, the others take its split
    topo = make_topology(cfg, rank, world_size, partition=[0] * world_size if planned and rank else None)
    model_dir = resolve_model_dir(cfg.model.path)
    eos, pad = special_tokens(model_dir)
    adapter_dir = Path(adapter_dir)
    refusal, token_ids = None, []
    if rank == 0:
        try:
            check_adapter(cfg, adapter_dir)
            token_ids = tokenize(prompts or [], load_tokenizer(cfg.model.path), read_config(cfg.model.path).vocab_size)
        except ConfigError as e:
            refusal = e
    in_flight = opts.in_flight or world_size
    device, _ = placement(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    data_groups = start_world(rank, world_size, cfg.run.timeout_s, "gloo") if world_size > 1 else None
    try:
        # 1. rank 0 tells the others what is coming (or that it refused): [ok, micro-batches, T, partition...]
        micro = [token_ids[i:i + opts.batch_size] for i in range(0, len(token_ids), opts.batch_size)]
        head = [0 if refusal else 1, len(micro), opts.max_new_tokens, *topo.partition]
        if world_size > 1:
            t = torch.tensor(head, dtype=torch.int64)
            with collective(rank, "receiving the prompts' plan from rank 0", 0, cfg.run.timeout_s):
                dist.broadcast(t, src=0)
            head = t.tolist()
        if refusal is not None:
            raise refusal
        if not head[0]:
            raise ConfigError("rank 0 refused to generate (its log names the setting)")
        n_micro, passes, partition = head[1], head[2], head[3:]
        if planned:
            topo = make_topology(cfg, rank, world_size, partition=partition)
        place = Placement(device, data_groups)
        wire = Wire(rank, device, data_groups=data_groups, timeout_s=cfg.run.timeout_s) if world_size > 1 else None
        decoder = RingDecoder(cfg, topo, place, wire, eos, pad)
        _load_adapters(decoder, adapter_dir if rank == 0 else None)
        # 2. waves of micro-batches, in_flight at a time
        completions: list[dict] = []
        timing = {"prefill_s": 0.0, "decode_s": 0.0}
        prompt_tokens = new_tokens = 0
        started = time.perf_counter()
        for w0 in range(0, n_micro, in_flight):
            wave = list(range(w0, min(n_micro, w0 + in_flight)))
            plan = decode_plan(world_size, len(wave), passes)
            marks = {}
            t0 = time.perf_counter()
            rows = [list(range(m * opts.batch_size, m * opts.batch_size + len(micro[m]))) for m in wave] \
                if rank == 0 else None
            flights = decoder.run(plan, [micro[m] for m in wave] if rank == 0 else None, rows, opts, marks)
            t1 = time.perf_counter()
            if rank == 0:
                timing["prefill_s"] += marks["prefill_done"] - t0
                timing["decode_s"] += t1 - marks["prefill_done"]
                for f in flights:
                    for b, i in enumerate(f.rows):
                        completions.append({"index": i, "prompt_ids": token_ids[i], "tokens": f.tokens[b]})
                        prompt_tokens += len(token_ids[i])
                        new_tokens += len(f.tokens[b])
            log.info("wave of %d micro-batches done in %.2fs", len(wave), t1 - t0)
        wall = time.perf_counter() - started
        own = {"rank": rank, "blocks": list(topo.blocks), "model_bytes": decoder.model_bytes,
               "kv_cache_peak_bytes": decoder.kv_peak_bytes, "compute_s": decoder.compute_s,
               "sends_held_peak_bytes": wire.held_peak_bytes if wire else 0}
        with collective(rank, "gathering every rank's figures", passes, cfg.run.timeout_s):
            ranks = gather_rank_rows(world_size, own, wire.counters if wire else Counters())
        if rank != 0:
            return None
        return _finish(cfg, completions, prompts, ranks, timing, wall, prompt_tokens, new_tokens, opts, out, echo)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _load_adapters(decoder: RingDecoder, adapter_dir: Path | None) -> None:
    """Rank 0 reads the adapter file and sends every rank the tensors of its blocks (no shared filesystem);
    every rank checks what it got, and all stop together if one finds a mismatch."""
    from .adapters import load_adapter_file

    rank, world_size, wire, timeout_s = decoder.topo.rank, decoder.topo.world_size, decoder.wire, \
        decoder.cfg.run.timeout_s
    mine = decoder.adapters.state_dict()
    if rank == 0:
        state = load_adapter_file(adapter_dir)
        for dst in range(1, world_size):
            wanted = decode_names(wire.recv(dst, ADAPTERS, 0, 0)[0])
            wire.send(dst, ADAPTERS, 1, 0, pack_state({k: state[k] for k in wanted if k in state}))
        wire and wire.flush()
    else:
        wire.send(0, ADAPTERS, 0, 0, [encode_names(sorted(mine))])
        state = unpack_state(wire.recv(0, ADAPTERS, 1, 0))
        wire.flush()
    missing = sorted(mine.keys() - state.keys())
    wrong = sorted(k for k in mine.keys() & state.keys() if mine[k].shape != state[k].shape)
    bad = torch.tensor([float(bool(missing or wrong))], dtype=torch.float64)
    if world_size > 1:
        with collective(rank, "checking the adapter on every rank", 0, timeout_s):
            dist.all_reduce(bad)
    if missing or wrong:
        example = (wrong or missing)[0]
        raise ConfigError(f"--adapter: the adapter does not fit adapter.kind={decoder.cfg.adapter.kind!r} "
                          f"r={decoder.cfg.adapter.r} target_modules={decoder.cfg.adapter.target_modules} on rank "
                          f"{rank}'s blocks: {len(missing)} tensors missing, {len(wrong)} of another shape (e.g. "
                          f"{example}); use the adapter settings of the run that wrote it (its config.yaml)")
    if bad.item():
        raise ConfigError("--adapter: another rank found that the adapter does not fit its blocks (its log says "
                          "which tensors)")
    decoder.adapters.load_state_dict({k: state[k] for k in mine})


def _finish(cfg, completions, prompts, ranks, timing, wall, prompt_tokens, new_tokens, opts, out, echo) -> dict:
    from .models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path)
    completions.sort(key=lambda c: c["index"])
    for c in completions:
        prompt = prompts[c["index"]] if prompts is not None else None
        c["prompt"] = prompt if isinstance(prompt, str) else None
        c["completion"] = tokenizer.decode(c["tokens"], skip_special_tokens=True) if tokenizer else None
    rows = len(completions)
    summary = {
        "mode": "single" if len(ranks) == 1 else "ring", "world_size": len(ranks), "prompts": rows,
        "batch_size": opts.batch_size, "in_flight": opts.in_flight or len(ranks),
        "max_new_tokens": opts.max_new_tokens, "greedy": opts.greedy, "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens, "wall_s": wall, "prefill_s": timing["prefill_s"], "decode_s": timing["decode_s"],
        # the first token of each prompt comes out of its prefill; the others out of decoding passes
        "prefill_tokens_per_s": prompt_tokens / timing["prefill_s"] if timing["prefill_s"] else None,
        "decode_tokens_per_s": (new_tokens - rows) / timing["decode_s"] if timing["decode_s"] else None,
        "ranks": ranks,
    }
    if echo:
        for c in completions:
            text = c["completion"] if c["completion"] is not None else " ".join(map(str, c["tokens"]))
            print(f"--- prompt {c['index']}: {c['prompt'] if c['prompt'] is not None else c['prompt_ids']}")
            print(text)
        sys.stdout.flush()
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(json.dumps(c) + "\n" for c in completions))
        tmp.replace(out)
        summary_path = out.with_name(out.stem + ".summary.json")
        summary_path.write_text(json.dumps(summary, indent=2))
    log.info("generated %d tokens for %d prompts in %.2fs: prefill %.1f tokens/s, decode %.1f tokens/s", new_tokens,
             rows, wall, summary["prefill_tokens_per_s"] or 0, summary["decode_tokens_per_s"] or 0)
    summary["completions"] = completions
    return summary
