"""Cutting a model into embedding / blocks / head reproduces the unsplit model, masks included."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ringada.models import CutModel, NotHeld, load_model, resolve_model_dir, save_tiny


def _inputs(seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding
    mask[2, 4:] = 0
    return ids, mask


def _chain(pieces: list[CutModel], ids, mask):
    """Run the pieces in order as separate processes would: hidden state handed from one to the next."""
    hidden = pieces[0].embed(ids)
    for piece in pieces:
        ctx = piece.context(hidden, mask)
        for i in range(piece.lo, piece.hi):
            hidden = piece.run_block(i, hidden, ctx)
    return pieces[-1].head(hidden, mask)


@pytest.mark.parametrize("family, task, labels", [
    ("llama", "causal_lm", 0), ("gpt2", "causal_lm", 0), ("bert", "classification", 3),
    ("llama", "classification", 2), ("gpt2", "classification", 2)])
def test_cut_equals_unsplit(tiny_dirs, family, task, labels):
    """Pieces loaded by ringada, run in order == the model as transformers itself loads and runs it."""
    cut = load_model(str(tiny_dirs[family]), task, labels, seed=1)
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    reference = cls.from_pretrained(tiny_dirs[family], **({"num_labels": labels} if labels else {})).eval()
    if task == "classification":  # a new head: give the reference ringada's (seeded) values
        head = "classifier" if family == "bert" else "score"
        reference.get_submodule(head).load_state_dict(cut.model.get_submodule(head).state_dict())
    ids, mask = _inputs()
    padded = ids.masked_fill(mask == 0, 0)  # padded positions hold the pad token, as ringada's data does
    with torch.no_grad():
        for x, m in ((padded, mask), (ids, None)):
            expected = reference(input_ids=x, attention_mask=m).logits
            torch.testing.assert_close(cut.forward(x, m), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family, task", [("llama", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "classification")])
def test_slices_held_by_different_processes_chain_to_the_unsplit_model(tiny_dirs, family, task):
    labels = 3 if task == "classification" else 0
    path = str(tiny_dirs[family])
    full = load_model(path, task, labels, seed=1)
    pieces = [load_model(path, task, labels, blocks=(0, 1), embed=True, head=False, seed=1),
              load_model(path, task, labels, blocks=(1, 3), embed=False, head=False, seed=1),
              load_model(path, task, labels, blocks=(3, 4), embed=False, head=True, seed=1)]
    assert pieces[1].model.get_submodule(pieces[1].family.embedding_names()[0].rpartition(".")[0]) is not None
    held = [sum(1 for b in p.blocks if not isinstance(b, torch.nn.Identity)) for p in pieces]
    assert held == [1, 2, 1]
    ids, mask = _inputs(1)
    with torch.no_grad():
        expected = full.model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(_chain(pieces, ids, mask), expected, rtol=0, atol=1e-6)


def test_middle_slice_holds_no_embedding_or_head(tiny_dirs):
    middle = load_model(str(tiny_dirs["llama"]), blocks=(1, 3), embed=False, head=False)
    assert isinstance(middle.model.model.embed_tokens, NotHeld) and isinstance(middle.model.lm_head, NotHeld)
    assert sum(p.numel() for p in middle.model.parameters()) < sum(p.numel() for p in load_model(
        str(tiny_dirs["llama"])).model.parameters()) / 2
    with pytest.raises(AssertionError):
        middle.run_block(0, torch.zeros(1, 2, 32), {})


def test_new_classification_head_is_the_same_in_every_process(tiny_dirs):
    a = load_model(str(tiny_dirs["llama"]), "classification", 2, seed=5)
    b = load_model(str(tiny_dirs["llama"]), "classification", 2, seed=5, blocks=(2, 4), embed=False)
    torch.testing.assert_close(a.model.score.weight, b.model.score.weight, rtol=0, atol=0)


def test_rejects_unknown_dirs_and_families(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path / "nothing"))
    bert = save_tiny(tmp_path / "bert", "bert", num_labels=2)
    with pytest.raises(ValueError, match="BERT models support classification"):
        load_model(str(bert), "causal_lm")


def test_real_smollm2_cut_equals_unsplit():
    cut = load_model("smollm2")
    assert cut.num_blocks == 30 and cut.model.config.hidden_size == 576
    reference = AutoModelForCausalLM.from_pretrained(resolve_model_dir("smollm2")).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1789, 28, 1163, 30, 216, 1401, 42]])
    with torch.no_grad():
        torch.testing.assert_close(cut.forward(ids), reference(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_recomputed_blocks_give_the_same_output_and_gradients_with_dropout(tiny_dirs):
    """star.recompute: activation checkpointing of the server's blocks changes memory, not values."""
    from ringada.adapters import add_adapters
    from ringada.config import load
    from ringada.train import run_blocks

    cfg = load(None, ["adapter.dropout=0.1", "adapter.r=4"])
    results = []
    for recompute in (False, True):
        cut = load_model(str(tiny_dirs["llama"]), "causal_lm", blocks=(0, 4))
        adapters = add_adapters(cut, cfg.adapter, 0, base_dir=str(tiny_dirs["llama"]))
        ids = torch.randint(0, cut.model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            hidden = cut.embed(ids)
        hidden.requires_grad_(True)
        out = run_blocks(cut, 0, 4, hidden, cut.context(hidden, None), frontier=1, grad=True, training=True,
                         seed=3, step=5, dropout=True, recompute=recompute)
        (out.square().mean()).backward()
        grads = [p.param.grad.clone() for p in adapters.params if p.param.grad is not None]
        results.append((out.detach(), grads, hidden.grad))
    (out0, grads0, in0), (out1, grads1, in1) = results
    assert torch.equal(out0, out1) and len(grads0) == len(grads1) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert in0 is None and in1 is None  # block 0 is below the frontier: no graph reaches the input


def test_safetensors_are_read_into_parameters_whatever_their_dtype_and_a_cut_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    from ringada.models import _read_safetensors

    src = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
           "e": torch.zeros(0, 2)}
    path = tmp_path / "m.safetensors"
    save_file(src, str(path))
    dst = {"a": torch.empty(3, 4), "b": torch.empty(5), "c": torch.empty(2, 3, dtype=torch.int64),
           "e": torch.empty(0, 2)}
    _read_safetensors(path, [(dst[k], k) for k in src])
    assert all(torch.equal(dst[k], src[k].to(dst[k].dtype)) for k in src)  # bf16 widened to the fp32 parameter
    with pytest.raises(ValueError, match="shape"):
        _read_safetensors(path, [(torch.empty(4, 3), "a")])
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="cut short"):
        _read_safetensors(path, [(torch.empty(3, 4), "a"), (torch.empty(5), "b"), (dst["c"], "c")])
