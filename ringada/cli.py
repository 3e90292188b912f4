"""Command line: ``ringada train --config FILE [--set section.key=value ...]`` (also under torchrun)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from . import config as config_mod


def setup_logging(rank: int, level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    # Library chatter that would drown the run's own log lines.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (defaults for every key not given)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. --set optim.lr=0.0005 (repeatable; value parsed as YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringada", description="Fine-tune pretrained transformer LMs with adapters "
                                     "across a ring (or star) of small machines, on torch.distributed.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train adapters; under torchrun the world comes from the environment",
                           description="Train adapters. pipeline.mode picks the topology: single (one process), "
                           "ring or line (torchrun ranks in a pipeline), sfl or sft (star).")
    _add_config_args(train)
    show = sub.add_parser("config", help="print the resolved config (defaults + file + --set) and exit")
    _add_config_args(show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank, args.log_level)
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except config_mod.ConfigError as e:
        print(f"ringada: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(config_mod.dump(cfg), end="")
        return 0
    if args.command == "train":
        from .launch import train

        try:
            train(cfg)
        except (config_mod.ConfigError, ValueError, FileNotFoundError) as e:
            print(f"ringada: error: {e}", file=sys.stderr)
            return 2
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
