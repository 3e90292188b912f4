"""Model and data for scripts/gpu_check.sh on a GPU machine that cannot reach a registry or hold SmolLM2.

    python scripts/gpu_assets.py prepare .gpu   # here: SmolLM2's config + Shakespeare as SmolLM2 token ids
    python scripts/gpu_assets.py build .gpu     # there: a model of SmolLM2-135M's shape with seeded weights

Only small files travel to the GPU machine (its transfer limit is 64 MiB; SmolLM2's weights are 270 MB even in
bf16), so the GPU bench runs a model of SmolLM2-135M's exact shape (30 blocks, hidden 576, 49152 tokens, tied
embeddings) whose weights are drawn from a seed. Speed does not depend on the values of the weights; losses do,
so the GPU bench reports tokens/s and memory, not learning.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def prepare(directory: Path, train_rows: int, eval_rows: int) -> None:
    from ringada.data import load_dataset
    from ringada.models import load_tokenizer, resolve_model_dir

    model = directory / "smollm2-shape"
    model.mkdir(parents=True, exist_ok=True)
    config = json.loads((resolve_model_dir("smollm2") / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = load_tokenizer("smollm2")
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        ds = load_dataset("shakespeare", split, task="causal_lm", seq_len=128, tokenizer=tokenizer)
        with open(directory / f"shakespeare-{split}.jsonl", "w") as fh:
            for ids in ds.input_ids[:rows].tolist():
                fh.write(json.dumps({"input_ids": ids}) + "\n")
    print(f"wrote {model}/config.json and {train_rows} + {eval_rows} rows of token ids to {directory}")


def build(directory: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = directory / "smollm2-shape"
    if (model_dir / "model.safetensors").is_file():
        return
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model_dir)
    print(f"built {model_dir} ({sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())}"
          " parameters, seeded weights)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("prepare", "build"))
    p.add_argument("directory", type=Path)
    p.add_argument("--train-rows", type=int, default=512)
    p.add_argument("--eval-rows", type=int, default=64)
    args = p.parse_args()
    if args.action == "prepare":
        prepare(args.directory, args.train_rows, args.eval_rows)
    else:
        build(args.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
