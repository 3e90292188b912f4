"""An independent single-process reference: plain transformers + peft (+ a hand-written bottleneck hook), no
ringada pipeline code. Every distributed mode is checked against what this produces."""

from __future__ import annotations

import re

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

_LAYER = re.compile(r"\.(?:layers|h|layer)\.(\d+)\.")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are exactly equal, inf when b is 0 and a is not)."""
    num = float((a.double() - b.double()).norm())
    den = float(b.double().norm())
    return 0.0 if num == 0 else (num / den if den else float("inf"))


def assert_adapters_equal(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:5]
    worst = max((rel_diff(got[k], want[k]), k) for k in want)
    assert worst[0] <= tol, f"relative difference {worst[0]:.3g} > {tol} at {worst[1]}"


def _base(model_dir, task, num_labels):
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels,
                                                                   dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def _loss_sum(logits, labels):
    if logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")


def _count(labels):
    return labels.numel() if labels.dim() == 1 else int((labels[:, 1:] != -100).sum())


class _Bottleneck(torch.nn.Module):
    def __init__(self, down_w, down_b, up_w, up_b):
        super().__init__()
        self.down_w, self.down_b = torch.nn.Parameter(down_w.clone()), torch.nn.Parameter(down_b.clone())
        self.up_w, self.up_b = torch.nn.Parameter(up_w.clone()), torch.nn.Parameter(up_b.clone())

    def forward(self, h):
        z = torch.nn.functional.gelu(h @ self.down_w.T + self.down_b)
        return h + z @ self.up_w.T + self.up_b


def load_reference(model_dir, adapter_dir, task="causal_lm", num_labels=0, kind="lora"):
    """(model, {peft key: parameter}) with the adapters of ``adapter_dir`` attached by stock means."""
    base = _base(model_dir, task, num_labels)
    if kind == "lora":
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        model.eval()
        state = get_peft_model_state_dict(model)
        by_key = {}
        for name, p in model.named_parameters():
            key = name.replace(".modules_to_save.default.", ".").replace(".default.", ".")
            if key in state:
                by_key[key] = p
        assert by_key.keys() == state.keys()
        return model, by_key
    tensors = load_file(f"{adapter_dir}/adapter_model.safetensors")
    by_key = {}
    for name, module in base.named_modules():
        prefix = name + ".bottleneck."
        if prefix + "down.weight" in tensors:
            adapter = _Bottleneck(*(tensors[prefix + k] for k in ("down.weight", "down.bias", "up.weight", "up.bias")))
            module.ref_adapter = adapter
            module.register_forward_hook(lambda m, a, out: m.ref_adapter(out))
            for k, p in zip(("down.weight", "down.bias", "up.weight", "up.bias"),
                            (adapter.down_w, adapter.down_b, adapter.up_w, adapter.up_b)):
                by_key[prefix + k] = p
    for key, value in tensors.items():  # a classification head saved next to the bottlenecks
        if key not in by_key:
            p = base.get_parameter(key)
            with torch.no_grad():
                p.copy_(value)
            p.requires_grad_(True)
            by_key[key] = p
    return base, by_key


def reference_train(model_dir, adapter_init_dir, steps, *, frontiers, lr, weight_decay=0.0,
                    betas=(0.9, 0.999), eps=1e-8, grad_clip=0.0, task="causal_lm", num_labels=0, kind="lora"):
    """Train on ``steps`` (a list of lists of (input_ids, labels, mask) micro-batches); returns (state, losses)."""
    model, params = load_reference(model_dir, adapter_init_dir, task, num_labels, kind)
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    losses = []
    for micro_batches, frontier in zip(steps, frontiers):
        for key, p in params.items():
            m = _LAYER.search(key)
            p.requires_grad_(m is None or int(m.group(1)) >= frontier)
        opt.zero_grad(set_to_none=True)
        total = sum(_count(labels) for _, labels, _ in micro_batches)
        step_loss = 0.0
        for ids, labels, mask in micro_batches:
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = _loss_sum(logits, labels) / total
            if loss.requires_grad:  # nothing trainable yet: the step only measures the loss
                loss.backward()
            step_loss += loss.item()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None], grad_clip)
        opt.step()
        losses.append(step_loss)
    return {k: p.detach().clone() for k, p in params.items()}, losses


@torch.no_grad()
def reference_eval(model, batches) -> float:
    total, count = 0.0, 0
    for ids, labels, mask in batches:
        total += float(_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels))
        count += _count(labels)
    return total / count
