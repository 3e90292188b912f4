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
    ev = sub.add_parser("eval", help="evaluate a saved adapter on data.eval in this process",
                        description="Eval loss, perplexity (causal LM) or accuracy (classification) of a saved "
                        "adapter on the first run.eval_batches batches of data.eval, in one process. Pass the run's "
                        "own config.yaml so that the model and adapter settings match. Prints one JSON object.")
    _add_config_args(ev)
    ev.add_argument("--adapter", default=None,
                    help="adapter directory in peft format (default: run.out_dir/adapter)")
    gen = sub.add_parser("generate", help="generate text with a trained adapter, across the ring (under torchrun) "
                         "or in one process",
                         description="Decode prompts with a saved adapter. Under torchrun the ranks form the "
                         "training ring: each holds its blocks and their KV cache, rank 0 the embedding, head and "
                         "sampler, and several micro-batches of prompts are in flight at once. Greedy unless "
                         "--temperature > 0. Completions go to stdout and, with --out, to a JSONL file (plus "
                         "OUT.summary.json with tokens/s and per-rank memory and bytes).")
    _add_config_args(gen)
    gen.add_argument("--adapter", default=None,
                     help="adapter directory in peft format (default: run.out_dir/adapter; a star round's "
                     "rounds/round_NNNN works too)")
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    gen.add_argument("--prompts", default=None, metavar="FILE",
                     help=".txt (one prompt per line) or .jsonl ('text', or pre-tokenized 'input_ids', per line)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    gen.add_argument("--seed", type=int, default=0,
                     help="sampling seed (each prompt draws from its own generator: batching does not matter)")
    gen.add_argument("--batch-size", type=int, default=1, help="prompts per micro-batch (left-padded; default 1)")
    gen.add_argument("--in-flight", type=int, default=0,
                     help="micro-batches in flight at once (default: as many as ranks)")
    gen.add_argument("--out", default=None, metavar="FILE.jsonl", help="write the completions here as JSONL")
    show = sub.add_parser("config", help="print the resolved config (defaults + file + --set) and exit")
    _add_config_args(show)
    plan = sub.add_parser("plan", help="print the per-rank pipeline plan of one step (no processes started)",
                          description="Print the partition and each rank's action list (F/B = forward/backward of "
                          "stage.micro-batch, sF/rF = send/receive activations, sB/rB = gradients) for one step.")
    _add_config_args(plan)
    plan.add_argument("--world", type=int, required=True, help="number of ranks")
    plan.add_argument("--step", type=int, default=0, help="optimizer step whose frontier to use (default 0)")
    plan.add_argument("--compute-only", action="store_true", help="hide sends and receives")
    plan.add_argument("--generate", action="store_true",
                      help="print the decoding plan of `ringada generate` instead (F = a pass m.p through the "
                      "rank's blocks, H = head and sampler, s/r = send/receive)")
    plan.add_argument("--micro-batches", type=int, default=None,
                      help="with --generate: micro-batches in flight (default: as many as ranks)")
    plan.add_argument("--max-new-tokens", type=int, default=3, help="with --generate: passes to show (default 3)")
    sim = sub.add_parser("simulate", help="predict a run's timings from its plans, measured block costs and a "
                         "profile (no processes started)",
                         description="Discrete-event simulation of ring/line/single runs (per-step plans with "
                         "the unfreezing frontier) and star rounds (server ordering), using per-block costs "
                         "measured once on this machine (cached) and the speeds/links of pipeline.profile or "
                         "star.profile. Writes out_dir/simulated_summary.json.")
    _add_config_args(sim)
    sim.add_argument("--world", type=int, required=True, help="number of ranks (star: 1 server + devices)")
    sim.add_argument("--steps", type=int, default=None, help="steps to simulate (default run.steps)")
    sim.add_argument("--cores", type=int, default=None,
                     help="the ranks share this many cores of one box (emulated or not): the ranks with work "
                     "share them event by event (default: a core per rank)")
    bench = sub.add_parser("bench", help="run systems side by side and write bench.json, bench.md and plots",
                           description="Runs systems on the same model, data, adapters and steps (SmolLM2 + "
                           "Shakespeare by default; --smoke: a tiny model), in rotating rounds, and reports tokens/s "
                           "(also relative to tdp-1f1b with the same trainable set), step time next to the simulator's "
                           "prediction, CPU seconds per step, peak RSS per rank, bytes on the wire and eval loss. "
                           "ring: ring-earlystop, ring-noearlystop, ring-nolookahead, ring-full, line, "
                           "line-nolookahead, tdp-gpipe, tdp-1f1b, tdp-1f1b-full, single. star: sfl, sft, sft-compressed (the shipped codec), "
                           "sfl-copy-per-device (with server memory and makespan over FIFO). compress: sft with each "
                           "codec setting. tta: ring-plateau, ring-full, line-full, tdp-1f1b-full, sfl, sft and "
                           "single-full to a target held-out loss. generate: decoding, one process against the ring.")
    bench.add_argument("--suite", choices=("ring", "star", "all", "compress", "tta", "generate"), default="ring",
                       help="ring, star, all (both); compress: sft with each codec setting (smashed bytes against "
                       "held-out loss, a Pareto plot); tta: time to a target held-out loss for ring, line, tdp, "
                       "sfl, sft and single on one token budget (--steps); generate: decoding in one process "
                       "against the ring")
    bench.add_argument("--target", type=float, default=None,
                       help="tta suite: the held-out loss to reach (default: 90%% of the way from the starting loss "
                       "to what single-full reaches within the budget)")
    bench.add_argument("--out", required=True, help="output directory")
    bench.add_argument("--smoke", action="store_true", help="tiny random model and data (seconds, for CI)")
    bench.add_argument("--repeats", type=int, default=1, help="rounds over all systems (median is reported)")
    bench.add_argument("--world", type=int, default=4, help="ranks of the distributed systems")
    bench.add_argument("--steps", type=int, default=4,
                       help="optimizer steps per system run (star: rounded to 2 rounds of local steps)")
    bench.add_argument("--systems", default=None,
                       help="comma-separated subset of the suite's systems (default: all of them)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="run.device of every run (cuda: ranks share the GPUs through gloo's pinned host "
                       "staging; tdp needs a GPU per rank and is reported as not run otherwise)")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a shared setting of every system, e.g. --set model.path=DIR (repeatable)")
    bench.add_argument("--max-new-tokens", type=int, default=32, help="generate suite: tokens per prompt")
    bench.add_argument("--adapter", default=None,
                       help="generate suite: adapter to decode with (default: the initial adapter; decoding speed "
                       "does not depend on its values)")
    bench.add_argument("--profile", default=None,
                       help="emulate this device/link profile: the ring suite runs ring-earlystop, ring-full and "
                       "line partitioned by capacity (e.g. configs/profiles/ring4.yaml), the star suite sfl, "
                       "sfl-fifo and sft (e.g. configs/profiles/edge4.yaml), next to the simulator's prediction; "
                       "the tta suite the ring and star systems (pick those that fit the profile with --systems; "
                       "--target is needed, single-full cannot be emulated)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank, args.log_level)
    if args.command == "bench":
        from pathlib import Path

        from .bench import generate_table, markdown_table, run_bench, run_generate_bench

        if args.suite == "generate":
            try:
                bench = run_generate_bench(Path(args.out), args.smoke, args.world, args.max_new_tokens, args.adapter,
                                           args.overrides, args.systems.split(",") if args.systems else None)
            except (ValueError, RuntimeError) as e:
                print(f"ringada: bench error: {e}", file=sys.stderr)
                return 2
            print(generate_table(bench), end="")
            return 0
        try:
            bench = run_bench(args.suite, Path(args.out), args.smoke, args.repeats, args.world, args.steps,
                              args.profile, device=args.device, overrides=args.overrides,
                              systems=args.systems.split(",") if args.systems else None, target=args.target)
        except (ValueError, RuntimeError) as e:
            print(f"ringada: bench error: {e}", file=sys.stderr)
            return 2
        print(markdown_table(bench), end="")
        return 0
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except config_mod.ConfigError as e:
        print(f"ringada: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(config_mod.dump(cfg), end="")
        return 0
    if args.command == "plan":
        return _print_plan(cfg, args)
    if args.command == "simulate":
        return _simulate(cfg, args)
    if args.command == "eval":
        import json
        from pathlib import Path

        from .runtime import evaluate_adapter

        try:
            result = evaluate_adapter(cfg, args.adapter or Path(cfg.run.out_dir) / "adapter")
        except (config_mod.ConfigError, ValueError, FileNotFoundError) as e:
            print(f"ringada: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(result))
        return 0
    if args.command == "generate":
        return _exit_code(lambda: _generate(cfg, args, rank))
    if args.command == "train":
        from .launch import train

        return _exit_code(lambda: train(cfg))
    return 2


def _exit_code(run) -> int:
    """Run a distributed command; its failures become the exit codes torchrun and users act on: 2 a setting
    or input to fix, 3 a non-finite stop (the checkpoint holds the last finite state), 1 a lost or silent peer
    (torchrun --max-restarts restarts from a checkpoint)."""
    from .comm import PeerError
    from .driver import NonFiniteError

    try:
        run()
    except (config_mod.ConfigError, ValueError, FileNotFoundError) as e:
        print(f"ringada: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"ringada: stopped: {e}", file=sys.stderr)
        return 3
    except PeerError as e:
        print(f"ringada: error: {e}", file=sys.stderr)
        return 1
    return 0


def _generate(cfg, args, rank: int) -> None:
    from pathlib import Path

    from .generate import GenerateOptions, generate, read_prompts

    opts = GenerateOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, in_flight=args.in_flight)
    # only rank 0 reads the prompts (the other boxes need not have the file)
    prompts = read_prompts(args.prompt, args.prompts) if rank == 0 else None
    generate(cfg, args.adapter or Path(cfg.run.out_dir) / "adapter", prompts, opts, args.out, echo=True)


def _print_plan(cfg, args) -> int:
    from . import schedule
    from .partition import head_cost_in_blocks
    from .runtime import make_topology, plan_speeds
    from .train import trainable_count

    if args.generate:
        return _print_decode_plan(cfg, args)
    if cfg.pipeline.mode in ("sfl", "sft"):
        return _print_star_plan(cfg, args)
    try:
        topo = make_topology(cfg, 0, args.world)
    except (config_mod.ConfigError, ValueError) as e:
        print(f"ringada: config error: {e}", file=sys.stderr)
        return 2
    num_blocks = sum(topo.partition)
    trainable = trainable_count(cfg.unfreeze, num_blocks, args.step, 0, 0)
    mode = "ring" if cfg.pipeline.mode == "ring" else "line"
    frontier = num_blocks - trainable if cfg.pipeline.early_stop else 0  # as PipelineRuntime.plan
    plan = schedule.build_schedule(mode, topo.partition, cfg.data.micro_batches, frontier,
                                   cfg.model.task == "classification", cfg.pipeline.schedule,
                                   head_cost=head_cost_in_blocks(cfg.model.path, cfg.model.task,
                                                                 cfg.model.num_labels),
                                   speeds=plan_speeds(cfg, args.world))
    print(f"{cfg.pipeline.mode}, blocks per rank {topo.partition}, {cfg.pipeline.schedule}, "
          f"{cfg.data.micro_batches} micro-batches, step {args.step}: {trainable} trainable blocks "
          f"(frontier {num_blocks - trainable}{'' if cfg.pipeline.early_stop else ', early_stop off'}); "
          f"backward stages {plan.backward}")
    print(plan.format(compute_only=args.compute_only))
    return 0


def _print_decode_plan(cfg, args) -> int:
    from .generate import _ring_config, decode_plan
    from .runtime import make_topology

    try:
        topo = make_topology(_ring_config(cfg, args.world), 0, args.world)
        plan = decode_plan(args.world, args.micro_batches or args.world, args.max_new_tokens)
    except (config_mod.ConfigError, ValueError) as e:
        print(f"ringada: config error: {e}", file=sys.stderr)
        return 2
    print(f"generate, blocks per rank {topo.partition}, {plan.micro_batches} micro-batches in flight, "
          f"{plan.passes} passes (pass m.0 = prefill of micro-batch m)")
    print(plan.format())
    return 0


def _print_star_plan(cfg, args) -> int:
    """A star's links as data: what each device's link carries at start-up, in one round, an evaluation and
    the end (^ up to the server, v down to the device)."""
    from .star import eval_plan, format_plan, make_star_topology, round_plan, start_plan, stop_plan

    try:
        topo = make_star_topology(cfg, 0, args.world)
    except (config_mod.ConfigError, ValueError) as e:
        print(f"ringada: config error: {e}", file=sys.stderr)
        return 2
    star = cfg.star
    round_index = args.step // star.local_steps
    print(f"{cfg.pipeline.mode}, {len(topo.devices)} devices at depths {topo.depths} of {topo.num_blocks} blocks, "
          f"round {round_index} ({star.local_steps} local steps, every device selected, none leaving)")
    print(f"start (each device): {format_plan(start_plan(resuming=False))}")
    print(f"round (each device): "
          f"{format_plan(round_plan(round_index, star.local_steps, star.local_steps, star.label_privacy))}")
    n_eval = cfg.run.eval_batches if cfg.data.eval else 0
    print(f"eval (device {topo.devices[0]}): {format_plan(eval_plan(True, n_eval, star.label_privacy))}")
    print(f"end: {format_plan(stop_plan())}")
    return 0


def _simulate(cfg, args) -> int:
    import json
    from pathlib import Path

    from .costs import block_costs
    from .profiles import load_profile
    from .sim import simulate_pipeline, simulate_star_step

    try:
        if args.cores is not None and args.cores < 1:
            raise ValueError(f"--cores: got {args.cores}; expected >= 1")
        if cfg.pipeline.mode in ("sfl", "sft"):
            from .star import make_star_topology

            topo = make_star_topology(cfg, 0, args.world)
            if cfg.star.profile is None:
                raise config_mod.ConfigError("star.profile: got null; simulating a star needs device speeds and "
                                             "links, e.g. configs/profiles/edge4.yaml")
            profile = load_profile(cfg.star.profile)
            costs = block_costs(cfg, cfg.data.batch_size)
            step = simulate_star_step(cfg.pipeline.mode, topo.depths, topo.num_blocks, costs, profile,
                                      cfg.star.schedule, cfg.compress.topk, args.cores, steps=cfg.star.local_steps,
                                      emulated=cfg.star.emulate, recompute=cfg.star.recompute)
            result = {"mode": cfg.pipeline.mode, "world_size": args.world, "simulated": True,
                      "steps": cfg.run.steps, "step": step,
                      "wall_s": step["makespan_s"] * cfg.run.steps,
                      "tokens_per_s": (args.world - 1) * cfg.data.batch_size * cfg.data.seq_len
                      / step["makespan_s"]}
        else:
            from .runtime import make_topology

            topo = make_topology(cfg, 0, args.world)
            profile = load_profile(cfg.pipeline.profile) if cfg.pipeline.profile else None
            rows = -(-cfg.data.batch_size // cfg.data.micro_batches)
            result = simulate_pipeline(cfg, topo.partition, block_costs(cfg, rows), profile, args.steps,
                                       args.cores)
    except (config_mod.ConfigError, ValueError) as e:
        print(f"ringada: config error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulated_summary.json").write_text(json.dumps(result, indent=2))
    print(f"{result['mode']} on {result['world_size']} ranks: predicted {result['wall_s']:.2f} s for "
          f"{result['steps']} steps, {result['tokens_per_s']:.0f} tokens/s")
    for r in result.get("ranks", []):
        print(f"  rank {r['rank']} blocks {r['blocks']}: fwd {r['fwd_s']:.2f}s bwd {r['bwd_s']:.2f}s "
              f"wait {r['wait_s']:.2f}s sent {r['bytes_sent'] / 1e6:.1f} MB")
    if "step" in result:
        print(f"  one step: makespan {result['step']['makespan_s']:.3f} s, order {result['step']['order']}")
    print(f"written to {out / 'simulated_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
