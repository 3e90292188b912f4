"""Single-process training equals a plain transformers + peft loop, and its outputs load in stock peft."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ringada.config import load
from ringada.data import load_dataset
from ringada.launch import train as run_single
from ringada.train import trainable_count
from tests.reference import assert_adapters_equal, load_reference, reference_eval, reference_train


def _config(tmp_path, model_dir, data, overrides=()):
    return load(None, [f"run.out_dir={tmp_path / 'out'}", f"model.path={model_dir}", f"data.train={data}",
                       f"data.eval={data}", "data.seq_len=16", "data.batch_size=4", "data.shuffle=false",
                       "run.steps=6", "run.eval_batches=2", "optim.lr=0.01", *overrides])


def _steps(cfg, ds, num_blocks):
    """The micro-batches and frontiers of each step, rebuilt from the data file independently."""
    steps, frontiers = [], []
    for s in range(cfg.run.steps):
        _, batch = ds.batch_at(s, cfg.data.batch_size, cfg.data.shuffle, cfg.run.seed)
        steps.append([(m.input_ids, m.labels, m.attention_mask) for m in batch.split(cfg.data.micro_batches)])
        frontiers.append(num_blocks - trainable_count(cfg.unfreeze, num_blocks, s, 0, 0))
    return steps, frontiers


@pytest.mark.parametrize("kind, overrides", [
    ("lora", ["data.micro_batches=2", "unfreeze.initial=1", "unfreeze.every=2", "optim.weight_decay=0.1",
              "optim.grad_clip=0.05"]),
    ("lora", ["data.micro_batches=3", "data.shuffle=true", "adapter.target_modules=[q_proj, o_proj, up_proj]"]),
    ("bottleneck", ["data.micro_batches=4", "unfreeze.initial=0", "unfreeze.every=2", "unfreeze.increment=2"]),
])
def test_single_equals_plain_peft_loop(tmp_path, tiny_dirs, token_jsonl, kind, overrides):
    cfg = _config(tmp_path, tiny_dirs["llama"], token_jsonl, [f"adapter.kind={kind}", *overrides])
    summary = run_single(cfg)
    out = tmp_path / "out"
    ds = load_dataset(str(token_jsonl), "train", task="causal_lm", seq_len=16)
    steps, frontiers = _steps(cfg, ds, 4)
    want, want_losses = reference_train(str(tiny_dirs["llama"]), str(out / "adapter_init"), steps,
                                        frontiers=frontiers, lr=0.01, weight_decay=cfg.optim.weight_decay,
                                        grad_clip=cfg.optim.grad_clip, kind=kind)
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert_adapters_equal(got, want)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in metrics]), torch.tensor(want_losses), rtol=1e-5,
                               atol=0)
    assert [m["trainable_blocks"] for m in metrics] == [4 - f for f in frontiers]
    # frozen adapters never moved: those of blocks never unfrozen keep their initial values bit for bit
    init = load_file(out / "adapter_init" / "adapter_model.safetensors")
    never = min(frontiers)
    frozen = [k for k in init if any(f".layers.{b}." in k for b in range(never))]
    assert all(torch.equal(got[k], init[k]) for k in frozen)
    assert (not frozen) == (never == 0)
    assert summary["ranks"][0]["blocks"] == [0, 4] and summary["steps"] == 6


def test_classification_head_trains_and_peft_reloads_it(tmp_path, tiny_dirs):
    rows = [{"input_ids": [(7 * i + j) % 120 + 1 for j in range(3 + i % 9)], "label": i % 3} for i in range(48)]
    path = tmp_path / "cls.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _config(tmp_path, tiny_dirs["bert"], path, ["model.task=classification", "model.num_labels=3",
                                                      "data.micro_batches=2", "unfreeze.initial=0",
                                                      "unfreeze.every=3"])
    summary = run_single(cfg)
    out = tmp_path / "out"
    ds = load_dataset(str(path), "train", task="classification", seq_len=16, num_labels=3)
    steps, frontiers = _steps(cfg, ds, 4)
    assert frontiers[0] == 4  # only the classifier trains at first
    want, _ = reference_train(str(tiny_dirs["bert"]), str(out / "adapter_init"), steps, frontiers=frontiers,
                              lr=0.01, task="classification", num_labels=3)
    assert_adapters_equal(load_file(out / "adapter" / "adapter_model.safetensors"), want)
    model, _ = load_reference(str(tiny_dirs["bert"]), str(out / "adapter"), "classification", 3)
    eval_set = [(b.input_ids, b.labels, b.attention_mask) for b in ds.eval_batches(4, 2)]
    assert reference_eval(model, eval_set) == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert 0.0 <= summary["eval_after"]["eval_accuracy"] <= 1.0


def test_outputs_follow_the_contract(tmp_path, tiny_dirs, token_jsonl):
    cfg = _config(tmp_path, tiny_dirs["gpt2"], token_jsonl, ["run.eval_every=3"])
    summary = run_single(cfg)
    out = tmp_path / "out"
    assert load(out / "config.yaml") == cfg
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(6))
    assert all({"step", "loss", "trainable_blocks", "tokens", "elapsed_s"} <= m.keys() for m in metrics)
    assert [m["tokens"] for m in metrics] == [64 * (s + 1) for s in range(6)]
    assert "eval_loss" in metrics[2] and "eval_loss" not in metrics[1]
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in ("mode", "world_size", "steps", "final_loss", "eval_loss", "tokens_per_s", "wall_s"):
        assert key in saved
    assert {"rank", "blocks", "fwd_s", "bwd_s", "bytes_sent", "bytes_recv", "peak_rss_bytes"} <= saved["ranks"][0].keys()
    for sub in ("adapter_init", "adapter"):
        assert (out / sub / "adapter_config.json").is_file() and (out / sub / "adapter_model.safetensors").is_file()
    # stock peft loads the saved adapter and reproduces the reported eval loss
    model, _ = load_reference(str(tiny_dirs["gpt2"]), str(out / "adapter"))
    ds = load_dataset(str(token_jsonl), "eval", task="causal_lm", seq_len=16)
    eval_set = [(b.input_ids, b.labels, b.attention_mask) for b in ds.eval_batches(4, 2)]
    assert reference_eval(model, eval_set) == pytest.approx(saved["eval_loss"], rel=1e-6)


def test_adapter_dropout_trains_but_never_touches_evaluation(tmp_path, tiny_dirs, token_jsonl):
    """With dropout on, evaluation still equals stock peft's (eval mode: no dropout), and training is seeded:
    two runs give the same adapters."""
    cfgs = [_config(tmp_path / str(i), tiny_dirs["llama"], token_jsonl, ["adapter.dropout=0.5"]) for i in range(2)]
    summaries = [run_single(c) for c in cfgs]
    model, _ = load_reference(str(tiny_dirs["llama"]), str(tmp_path / "0" / "out" / "adapter"))
    ds = load_dataset(str(token_jsonl), "eval", task="causal_lm", seq_len=16)
    eval_set = [(b.input_ids, b.labels, b.attention_mask) for b in ds.eval_batches(4, 2)]
    assert reference_eval(model, eval_set) == pytest.approx(summaries[0]["eval_loss"], rel=1e-6)
    a, b = (load_file(tmp_path / str(i) / "out" / "adapter" / "adapter_model.safetensors") for i in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_command_reproduces_the_runs_eval_and_rejects_a_mismatched_adapter(tmp_path, tiny_dirs, token_jsonl,
                                                                                 capsys):
    from ringada.cli import main

    cfg = _config(tmp_path, tiny_dirs["llama"], token_jsonl, ["data.micro_batches=2"])
    summary = run_single(cfg)
    out = tmp_path / "out"
    assert main(["eval", "--config", str(out / "config.yaml")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert result["eval_ppl"] == pytest.approx(summary["eval_after"]["eval_ppl"], rel=1e-6)
    # the initial adapter evaluates to the run's "before" numbers
    assert main(["eval", "--config", str(out / "config.yaml"), "--adapter", str(out / "adapter_init")]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(summary["eval_before"]["eval_loss"],
                                                                            rel=1e-6)
    assert main(["eval", "--config", str(out / "config.yaml"), "--set", "adapter.r=2"]) == 2
    err = capsys.readouterr().err
    assert "adapter.kind='lora' r=2" in err and "of another shape" in err and "config.yaml" in err
    assert main(["eval", "--config", str(out / "config.yaml"), "--adapter", str(tmp_path / "nowhere")]) == 2
    assert "adapter_model.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_chunked_head_loss_equals_the_full_logits(tiny_dirs, fam, monkeypatch):
    """head_loss never builds the whole [B, T, vocab] logits: chunk by chunk it gives loss_sum's value, the
    same argmax hits and the same gradient with respect to the hidden states."""
    from ringada import train
    from ringada.models import load_model
    from ringada.train import correct_count, head_loss, loss_sum

    cut = load_model(str(tiny_dirs[fam]), "causal_lm")
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 16, 32, generator=gen, requires_grad=True)
    labels = torch.randint(0, 128, (3, 16), generator=gen)
    labels[0, :6] = -100
    logits = cut.head(hidden, None)
    want = loss_sum(logits, labels)
    (want_grad,) = torch.autograd.grad(want / 7, hidden)
    for chunk, plain in ((5, 0), (16, 0), (1000, 0), (1000, 2**20)):  # several chunks, one, and plain autograd
        monkeypatch.setattr(train, "PLAIN_HEAD_LOGITS", plain)
        got, hits = head_loss(cut, hidden, None, labels, chunk_tokens=chunk)
        (grad,) = torch.autograd.grad(got / 7, hidden)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-9)
        assert hits == correct_count(logits.detach(), labels)
    with torch.no_grad():
        assert head_loss(cut, hidden, None, labels, chunk_tokens=5)[0] == pytest.approx(float(want), rel=1e-6)


def test_plan_command_prints_the_plan_a_ring_runs(tiny_dirs, token_jsonl, capsys):
    """`ringada plan` builds the plan the runtime builds for that step: with pipeline.early_stop false,
    backward runs through every stage (frontier 0), and rank 0's order comes from the head's cost."""
    from ringada import schedule
    from ringada.cli import main
    from ringada.partition import head_cost_in_blocks
    from ringada.runtime import make_topology

    path = str(tiny_dirs["llama"])  # 4 blocks, the top one trainable
    sets = [f"model.path={path}", f"data.train={token_jsonl}", f"data.eval={token_jsonl}", "pipeline.mode=ring",
            "unfreeze.initial=1", "unfreeze.every=100", "data.micro_batches=3"]
    for early_stop, frontier in (("true", 3), ("false", 0)):
        args = [*sets, f"pipeline.early_stop={early_stop}"]
        assert main(["plan", "--world", "2", "--compute-only", *[x for a in args for x in ("--set", a)]]) == 0
        out = capsys.readouterr().out
        cfg = load(None, args)
        plan = schedule.build_schedule("ring", make_topology(cfg, 0, 2).partition, 3, frontier, False,
                                       cfg.pipeline.schedule, head_cost=head_cost_in_blocks(path))
        assert plan.format(compute_only=True) in out
        assert f"backward stages {plan.backward}" in out
    assert "early_stop off" in out and all(plan.backward)
