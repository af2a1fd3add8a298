"""The optimiser's parameter groups and update, and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from vit import create_model
from vit.config import OptimConfig
from vit.optim import build_optimizer, build_scheduler


def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = create_model("vit_mini_patch7_28", depth=2)
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert set(decay) == {0.0, 0.05}
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "head.bias"} <= decay[0.0]
    assert all(n.endswith("weight") and "norm" not in n for n in decay[0.05])
    assert len(decay[0.0]) + len(decay[0.05]) == len(names)


def test_fused_update_equals_torchs_reference_adamw():
    # no qkv bias: a bias on the keys gets a zero gradient up to rounding (softmax ignores
    # it), and Adam's update of rounding noise is noise
    model = create_model("vit_mini_patch7_28", depth=2, qkv_bias=False)
    reference = create_model("vit_mini_patch7_28", depth=2, qkv_bias=False)
    reference.load_state_dict(model.state_dict())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    fused = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.05))
    assert fused.defaults["fused"]
    # the same groups over the twin's parameters, updated one tensor at a time by torch
    twin = dict(zip(model.parameters(), reference.parameters()))
    groups = [
        {"params": [twin[p] for p in g["params"]], "weight_decay": g["weight_decay"]}
        for g in fused.param_groups
    ]
    plain = torch.optim.AdamW(groups, lr=1e-2, foreach=False, fused=False)
    assert not any(g["fused"] or g["foreach"] for g in plain.param_groups)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    for _ in range(3):
        for net, opt in ((model, fused), (reference, plain)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert not torch.equal(a, start[name]), f"{name} did not move"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.0])
def test_schedule_warms_up_then_decays_to_min_lr(warmup_epochs):
    model = create_model("vit_mini_patch7_28", depth=1)
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=warmup_epochs)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10, epochs=5)
    rates = []
    for step in range(51):
        scheduler.step_update(num_updates=step)
        rates.append(optimizer.param_groups[0]["lr"])
    warm = round(warmup_epochs * 10)
    if warm:
        assert rates[0] == pytest.approx(1e-6)
        assert all(a < b for a, b in zip(rates[:warm], rates[1 : warm + 1]))
    assert rates[warm] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[warm:], rates[warm + 1 :]))
    assert rates[50] == pytest.approx(1e-5)
