"""Shared fixtures: tiny random models built from transformers configs (never fetched), quiet libraries."""

from __future__ import annotations

import json
import warnings

import pytest
import transformers

from ringada.models import save_tiny

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", module="peft")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> directory of a tiny random model (4 blocks, hidden 32, vocab 128)."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny(root / fam, fam, num_labels=3 if fam == "bert" else 0) for fam in ("llama", "gpt2", "bert")}


@pytest.fixture(scope="session")
def token_jsonl(tmp_path_factory):
    """Pre-tokenized causal-LM data: 40 lines of 20 token ids each, deterministic."""
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "tokens.jsonl"
    with open(path, "w") as fh:
        for _ in range(40):
            fh.write(json.dumps({"input_ids": [rng.randrange(1, 128) for _ in range(20)]}) + "\n")
    return path


@pytest.fixture(scope="session")
def pool2():
    """Two started ranks, shared by every multi-process test module."""
    from tests.ranks import RankPool

    pool = RankPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool3():
    from tests.ranks import RankPool

    pool = RankPool(3)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool4():
    from tests.ranks import RankPool

    pool = RankPool(4)
    yield pool
    pool.close()
