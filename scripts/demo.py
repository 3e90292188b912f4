"""`make demo`: fine-tune SmolLM2-135M-Instruct with LoRA on Shakespeare and print held-out perplexity."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ringada.cli import main  # noqa: E402


def run() -> int:
    config = REPO / "configs" / "single_smollm2.yaml"
    out = REPO / "out" / "demo-single"
    rc = main(["train", "--config", str(config), "--set", f"run.out_dir={out}"])
    if rc:
        return rc
    import json

    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    print()
    print(f"held-out perplexity: {before['eval_ppl']:.2f} before -> {after['eval_ppl']:.2f} after "
          f"{summary['steps']} steps ({summary['tokens_per_s']:.0f} tokens/s, {summary['wall_s']:.0f} s)")
    print(f"adapter written to {out / 'adapter'} (loadable with peft's PeftModel.from_pretrained)")
    return 0 if after["eval_ppl"] < before["eval_ppl"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run())
