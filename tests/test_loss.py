"""Exact maths of the training-time anchor on the tiny model: injected gradients, pass selection, steering."""

from __future__ import annotations

import pytest
import torch

from anchor.axis import AssistantAxis, PersonaSpace
from anchor.capping import Steer
from anchor.engine import Anchor, default_layers
from anchor.hooks import LayerHooks
from anchor.loss import answer_window, floor_penalty, match_penalty, sequence_mean
from anchor.reference import Reference
from tests.conftest import make_tiny_model

LAYERS = [1, 2]



def _batch(vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Three rows with prompt tokens (label -100), one right-padded row, one with most tokens unlabelled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, :7] = -100
    attention = torch.ones_like(ids)
    attention[1, 10:] = 0
    labels[1, 10:] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _layer_outputs(model: torch.nn.Module, layers: list[int], **inputs) -> tuple[dict[int, torch.Tensor], object]:
    """Decoder-layer outputs recorded by a hook (with grad), and the model output."""
    seen: dict[int, torch.Tensor] = {}

    def keep(i: int, h: torch.Tensor) -> None:
        seen[i] = h

    with LayerHooks(model, layers, keep):
        out = model(**inputs)
    return seen, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------------


def test_sequence_mean_averages_tokens_then_rows():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, False], [False, False, True], [False, False, False]])
    # row means 1.5 and 30; the empty row counts as 0 so micro-batches of equal size add up exactly
    assert sequence_mean(values, mask).item() == pytest.approx((1.5 + 30.0 + 0.0) / 3)


def test_floor_and_match_penalties_by_hand():
    proj = torch.tensor([[0.0, 1.0, 3.0], [4.0, 0.0, -2.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    # tau 2, gap 2, on each row's mean: row 0 mean 4/3 -> hinge (1/3)^2; row 1 mean 2 -> 0; row 2 empty -> 0
    assert floor_penalty(proj, tau=2.0, gap=2.0, mask=mask).item() == pytest.approx((1 / 9) / 3)
    # a token far below tau does not trip the floor while its answer's mean is above it (τ is a per-answer quantile)
    assert floor_penalty(torch.tensor([[-5.0, 9.0]]), tau=2.0, gap=1.0, mask=torch.ones(1, 2, dtype=torch.bool)) == 0
    proj, mask = proj[:1], mask[:1]
    ref = torch.tensor([[1.0, 1.0, 1.0]])
    assert match_penalty(proj, ref, gap=2.0, mask=mask).item() == pytest.approx((0.25 + 0 + 1.0) / 3)


def steering_vector(axis: AssistantAxis, layer: int, coefficient: float) -> torch.Tensor:
    """Preventative steering's push at ``layer``: capping's ``Steer`` with a negative coefficient."""
    return Steer(None, axis, -coefficient, [layer]).vector(layer, axis.unit[layer].float())


def test_steering_vector_points_away_from_the_assistant(tiny_axis):
    vec = steering_vector(tiny_axis, 2, coefficient=1.5)
    assert float(vec @ tiny_axis.unit[2]) == pytest.approx(-1.5 * float(tiny_axis.residual_norm[2]), rel=1e-5)


def _synthetic_axis(n_layers: int, seed: int = 0) -> AssistantAxis:
    g = torch.Generator().manual_seed(seed)
    hidden, roles = 6, 5
    role_vectors = torch.randn(roles, n_layers, hidden, generator=g)
    default_mean = torch.randn(n_layers, hidden, generator=g)
    axis = default_mean - role_vectors.mean(0)
    quantiles = torch.sort(torch.randn(n_layers, 101, generator=g), dim=1).values
    return AssistantAxis(
        axis=axis, default_mean=default_mean, role_vectors=role_vectors, role_names=[f"r{i}" for i in range(roles)],
        quantiles={"default": quantiles, "roles": quantiles - 1}, residual_norm=torch.ones(n_layers),
        pca=PersonaSpace.fit(role_vectors, default_mean), metadata={},
    )


@pytest.mark.parametrize("n_layers", [4, 30, 64])
def test_default_layers_is_the_best_upper_middle_band(n_layers):
    axis = _synthetic_axis(n_layers)
    band = default_layers(axis)
    width = max(2, n_layers // 8)
    assert band == list(range(band[0], band[0] + width))
    assert n_layers // 2 <= band[0] and band[-1] < max(n_layers // 2 + width, int(0.85 * n_layers))
    cos = axis.pc1_cosine().abs()
    chosen = float(cos[band].mean())
    for start in range(n_layers // 2, max(n_layers // 2 + width, int(0.85 * n_layers)) - width + 1):
        assert chosen >= float(cos[start:start + width].mean()) - 1e-7


# ----------------------------------------------------------------------------------------------------------------
# Injected gradient == autograd gradient of the explicit loss
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINTING = {"none": None, "reentrant": True, "non_reentrant": False}


def _train_model(tokenizer, checkpointing: bool | None, seed: int = 0) -> torch.nn.Module:
    model = make_tiny_model(tokenizer, seed=seed).train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    return model


def _perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("checkpointing", list(CHECKPOINTING))
@pytest.mark.parametrize("method", ["floor", "match"])
def test_injected_gradient_equals_explicit_penalty_gradient(tiny_tokenizer, tiny_axis, method, checkpointing):
    mode = CHECKPOINTING[checkpointing]
    batch = _batch(len(tiny_tokenizer))
    weight, ga, percentile = 0.7, 2, 90.0
    mask = batch["labels"] != -100

    # injected: the trainer's own loss only; the hooks add the penalty's gradient
    model = _train_model(tiny_tokenizer, mode)
    reference = Reference(model) if method == "match" else None
    _perturb(model)  # the reference keeps the unperturbed weights, so match has something to pull against
    with Anchor(model, tiny_axis, method, LAYERS, weight, percentile, reference=reference, grad_accumulation=ga):
        model(**batch).loss.backward()
    injected = _grads(model)

    # explicit: the same penalty written out and added to the loss
    model = _train_model(tiny_tokenizer, mode)
    if method == "match":
        frozen = make_tiny_model(tiny_tokenizer).eval()
        with torch.no_grad():
            ref_out, _ = _layer_outputs(frozen, LAYERS, **batch)
    _perturb(model)
    outs, out = _layer_outputs(model, LAYERS, **batch)
    penalty = 0.0
    for i in LAYERS:
        proj = outs[i] @ tiny_axis.unit[i]
        gap = float(tiny_axis.axis[i].norm())
        if method == "floor":
            penalty = penalty + floor_penalty(proj, tiny_axis.tau(i, percentile), gap, mask)
        else:
            penalty = penalty + match_penalty(proj, ref_out[i] @ tiny_axis.unit[i], gap, mask)
    assert float(penalty.detach()) > 1e-3  # the penalty is active, so the comparison means something
    (out.loss + weight * penalty / len(LAYERS) / ga).backward()
    explicit = _grads(model)

    assert _rel(injected, explicit) <= 1e-6


def test_fp16_loss_scale_multiplies_the_injected_gradient(tiny_tokenizer, tiny_axis):
    batch, scale = _batch(len(tiny_tokenizer)), 1024.0
    model = _train_model(tiny_tokenizer, None)
    with Anchor(model, tiny_axis, "floor", LAYERS, 0.5, 90.0, grad_scale=lambda: torch.tensor(scale)):
        (model(**batch).loss * scale).backward()
    injected = _grads(model)
    model = _train_model(tiny_tokenizer, None)
    with Anchor(model, tiny_axis, "floor", LAYERS, 0.5, 90.0):
        model(**batch).loss.backward()
    unscaled = _grads(model)
    assert _rel(injected, unscaled * scale) <= 1e-6


def test_replay_gradient_equals_explicit_and_starts_at_zero(tiny_tokenizer, tiny_axis):
    batch = _batch(len(tiny_tokenizer))
    g = torch.Generator().manual_seed(5)
    replay_ids = torch.randint(0, len(tiny_tokenizer), (2, 9), generator=g)
    attention = torch.ones_like(replay_ids)
    answer = torch.zeros_like(replay_ids, dtype=torch.bool)
    answer[:, 5:] = True
    weight, layers = 0.9, [1, 2, 3]

    model = _train_model(tiny_tokenizer, False)
    anchor = Anchor(model, tiny_axis, "replay", [1], weight, reference=Reference(model), replay_layers=layers)
    anchor.method("replay").set_batch(anchor, replay_ids, attention, answer, step=0)
    anchor.start_step()
    model(**batch)
    assert anchor.pop_metrics()["replay_penalty"][0].item() == 0.0  # the model is still the reference
    _perturb(model)
    model.zero_grad()
    anchor.start_step()
    model(**batch).loss.backward()
    injected = _grads(model)
    anchor.detach()

    model = _train_model(tiny_tokenizer, False)
    frozen = make_tiny_model(tiny_tokenizer).eval()
    with torch.no_grad():
        ref, _ = _layer_outputs(frozen, layers, input_ids=replay_ids, attention_mask=attention)
    _perturb(model)
    outs, _ = _layer_outputs(model, layers, input_ids=replay_ids, attention_mask=attention)
    terms = [match_penalty(outs[i] @ tiny_axis.unit[i], ref[i] @ tiny_axis.unit[i], float(tiny_axis.axis[i].norm()),
                           answer) for i in layers]
    penalty = torch.stack(terms).mean()
    assert float(penalty.detach()) > 1e-3
    (model(**batch).loss + weight * penalty).backward()
    assert _rel(injected, _grads(model)) <= 1e-6


@pytest.mark.parametrize("checkpointing", list(CHECKPOINTING))
@pytest.mark.parametrize("method", ["floor", "preventative"])
def test_lm_replay_gradient_equals_explicit_lm_loss(tiny_tokenizer, tiny_axis, method, checkpointing):
    """The LM replay term's injected gradient equals that of the written-out loss, once per optimizer step, with
    the method's own term beside it; its forward is never steered."""
    mode = CHECKPOINTING[checkpointing]
    batch = _batch(len(tiny_tokenizer))
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 7:] = 0
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[0, 4:] = True
    answer[1, 5:7] = True
    weight, lm_weight, coefficient = 0.6, 2.0, 0.3

    model = _train_model(tiny_tokenizer, mode)
    with Anchor(model, tiny_axis, [method, "lm_replay"], LAYERS, weight, 90.0, steer_coefficient=coefficient,
                method_weights=[1.0, lm_weight]) as anchor:
        anchor.method("lm_replay").set_batch(ids, attention, answer)
        anchor.start_step()
        model(**batch).loss.backward()
        model(**batch)  # a second micro-batch of the same step: the replay term is not added again
        metrics = anchor.pop_metrics()
    injected = _grads(model)
    assert metrics["lm_replay_loss"][1].item() == 1.0

    model = _train_model(tiny_tokenizer, mode)
    logits = model(input_ids=ids, attention_mask=attention).logits  # unsteered
    labels = torch.where(answer, ids, torch.full_like(ids, -100))
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())  # a causal LM's loss
    assert metrics["lm_replay_loss"][0].item() == pytest.approx(lm.item(), rel=1e-6)
    steer = {i: steering_vector(tiny_axis, i, coefficient) * weight for i in LAYERS} if method == "preventative" else {}
    with LayerHooks(model, LAYERS, lambda i, h: h + steer[i] if steer else None):
        outs, out = _layer_outputs(model, LAYERS, **batch)
    loss = out.loss + weight * lm_weight * lm
    if method == "floor":
        mask = batch["labels"] != -100
        loss = loss + weight * sum(floor_penalty(outs[i] @ tiny_axis.unit[i], tiny_axis.tau(i, 90.0),
                                                 float(tiny_axis.axis[i].norm()), mask) for i in LAYERS) / len(LAYERS)
    loss.backward()
    assert _rel(injected, _grads(model)) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Which passes the hooks act on
# ----------------------------------------------------------------------------------------------------------------


def _lora(tokenizer):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(make_tiny_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_hooks_skip_eval_nograd_and_adapter_disabled_passes(tiny_tokenizer, tiny_axis):
    model = _lora(tiny_tokenizer)
    batch = _batch(len(tiny_tokenizer))
    anchor = Anchor(model, tiny_axis, "floor", LAYERS, 1.0, 90.0)
    model.train()
    with model.disable_adapter():
        model(**batch)  # a DPO-style reference pass through the same modules
    assert anchor.pop_metrics() == {}
    with torch.no_grad():
        model(**batch)  # a no-grad pass of the same batch (TRL's metrics pass) must not count twice
    assert anchor.pop_metrics() == {}
    model.eval()
    model(**batch)
    assert anchor.pop_metrics() == {}
    model.train()
    model(**batch)
    metrics = anchor.pop_metrics()
    n_labelled = int((batch["labels"] != -100).sum())
    assert metrics["proj/layer_1"][1].item() == n_labelled  # training tokens only, once
    anchor.detach()


def test_another_active_adapter_counts_as_reference(tiny_tokenizer, tiny_axis):
    from peft import LoraConfig

    model = _lora(tiny_tokenizer)
    model.add_adapter("ref", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    anchor = Anchor(model, tiny_axis, "floor", LAYERS, 1.0, 90.0)
    model.train()
    model.set_adapter("ref")  # TRL's reference pass when re-training an existing adapter
    model(**_batch(len(tiny_tokenizer)))
    assert anchor.pop_metrics() == {}
    model.set_adapter("default")
    model(**_batch(len(tiny_tokenizer)))
    assert "penalty" in anchor.pop_metrics()


def test_match_with_peft_uses_the_adapter_disabled_model(tiny_tokenizer, tiny_axis):
    model = _lora(tiny_tokenizer)
    batch = _batch(len(tiny_tokenizer))
    anchor = Anchor(model, tiny_axis, "match", LAYERS, 1.0, reference=Reference(model))
    model.train()
    model(**batch)
    assert anchor.pop_metrics()["penalty"][0].item() == 0.0  # LoRA starts at B = 0: policy == reference
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model(**batch)
    got = anchor.pop_metrics()["penalty"][0].item()
    anchor.detach()
    with torch.no_grad(), model.disable_adapter():
        ref, _ = _layer_outputs(model, LAYERS, **batch)
    with torch.no_grad():
        pol, _ = _layer_outputs(model, LAYERS, **batch)
    mask = batch["labels"] != -100
    expected = sum(float(match_penalty(pol[i] @ tiny_axis.unit[i], ref[i] @ tiny_axis.unit[i],
                                       float(tiny_axis.axis[i].norm()), mask)) for i in LAYERS) / len(LAYERS)
    assert got == pytest.approx(expected, rel=1e-5) and got > 0


def test_preventative_steers_in_training_only_and_away_from_the_assistant(tiny_tokenizer, tiny_axis):
    batch = _batch(len(tiny_tokenizer))
    layer, k, weight = 2, 2.0, 0.5
    model = make_tiny_model(tiny_tokenizer)
    with torch.no_grad():
        model.train()
        plain_train, _ = _layer_outputs(model, [layer], **batch)
        model.eval()
        plain_eval = model(**batch).logits
    anchor = Anchor(model, tiny_axis, "preventative", [layer], weight, steer_coefficient=k)
    with torch.no_grad():
        model.train()
        steered, _ = _layer_outputs(model, [layer], **batch)  # registered after the anchor: sees its output
        model.eval()
        assert torch.equal(model(**batch).logits, plain_eval)  # no steering at inference
    shift = (steered[layer] - plain_train[layer]) @ tiny_axis.unit[layer]
    expected = -weight * k * float(tiny_axis.residual_norm[layer])
    assert torch.allclose(shift, torch.full_like(shift, expected), rtol=1e-4)
    anchor.detach()


def test_nonfinite_projection_adds_no_gradient_and_is_counted(tiny_tokenizer, tiny_axis):
    """A NaN activation already poisons the trainer's own loss; the anchor must not add a non-finite term of its own
    (or any term: the micro-batch's penalty is skipped), and it counts the bad tokens for the warning."""
    model = make_tiny_model(tiny_tokenizer).train()
    anchor = Anchor(model, tiny_axis, "floor", [2], 5.0, 90.0)
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 5, 32, generator=g) * 0.01  # far below τ: the floor penalty is active
    grads = {}
    for name, poison in (("clean", False), ("poisoned", True)):
        hidden = clean.clone()
        if poison:
            hidden[1, 3] = float("nan")
        hidden.requires_grad_()
        anchor._mode = "policy"  # what the forward pre-hook sets for a training pass of the policy
        out = anchor._on_layer(2, hidden)
        out.nan_to_num(0.0).sum().backward()
        grads[name] = hidden.grad
    expected = torch.ones_like(clean)
    expected[1, 3] = 0.0  # nan_to_num passes no gradient to the NaN entries; the penalty adds none at all
    assert not torch.equal(grads["clean"], torch.ones_like(clean))  # the penalty is active on clean activations
    assert torch.equal(grads["poisoned"], expected)
    total, count = anchor.pop_metrics()["nonfinite"]
    assert total.item() == 1 and count.item() == 2 * 2 * 5
    anchor.detach()


def test_detach_leaves_the_model_as_it_was(tiny_tokenizer, tiny_axis):
    model = make_tiny_model(tiny_tokenizer).train()
    anchor = Anchor(model, tiny_axis, "preventative", LAYERS, 1.0, steer_coefficient=3.0)
    anchor.detach()
    assert not anchor.attached
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_bad_arguments_are_refused(tiny_tokenizer, tiny_axis):
    model = make_tiny_model(tiny_tokenizer)
    with pytest.raises(ValueError, match="choose one of"):
        Anchor(model, tiny_axis, "ceiling")
    with pytest.raises(ValueError, match="frozen reference"):
        Anchor(model, tiny_axis, "match")
    with pytest.raises(ValueError, match="out of range"):
        Anchor(model, tiny_axis, "floor", layers=[4])


def test_answer_window_starts_at_the_position_predicting_the_earliest_answer_token():
    answer = torch.zeros(3, 10, dtype=torch.bool)
    answer[0, 6:9] = True
    answer[1, 4:7] = True  # the earliest answer token: position 3 predicts it, so 10 - 3 = 7 positions
    assert answer_window(answer) == 7
    assert answer_window(answer[:1]) == 5
    assert answer_window(torch.zeros(2, 10, dtype=torch.bool)) == 10  # nothing to read: every position
    answer[2, 0] = True  # an answer at the first position has no predicting position: every position
    assert answer_window(answer) == 10
