"""The method registry: a method from outside the package, composition, each method's exact maths, old checkpoints."""

from __future__ import annotations

import copy
import json
import logging
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from datasets import Dataset
from safetensors.torch import save_file

from anchor.callback import AnchorCallback, AnchorConfig
from anchor.engine import Anchor
from anchor.methods import AnchorMethod, available_methods, register_method
from anchor.reference import Reference, check_copyable
from anchor.state import load_state
from tests.conftest import make_tiny_model

LAYERS = [1, 2]
CHECKPOINTING = {"none": None, "reentrant": True, "non_reentrant": False}


@register_method
class HiddenNorm(AnchorMethod):
    """A toy method written outside the package: penalise the mean squared norm of the hidden state."""

    name = "toy_hidden_norm"
    calls: ClassVar[list[str]] = []

    def start_step(self, engine: Anchor, step: int) -> None:
        HiddenNorm.calls.append(f"step {step}")

    def penalty(self, engine: Anchor, layer: int, proj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (proj ** 2 * mask).sum() / mask.sum().clamp(min=1)


def _sft_data(n: int = 8) -> Dataset:
    return Dataset.from_list([{"messages": [{"role": "user", "content": f"Is Paris in France? {i}"},
                                            {"role": "assistant", "content": "Yes, it is. " * (1 + i % 3)}]}
                              for i in range(n)])


def _trainer(tokenizer, tmp_path, callbacks, **overrides):
    from trl import SFTConfig, SFTTrainer

    args = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", dataloader_num_workers=0,
                disable_tqdm=True, seed=0, bf16=False, optim="sgd")
    args.update(overrides)
    return SFTTrainer(model=make_tiny_model(tokenizer), args=SFTConfig(**args), train_dataset=_sft_data(),
                      processing_class=tokenizer, callbacks=callbacks)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_method_from_outside_the_package_trains_and_composes(tiny_tokenizer, tiny_axis, tmp_path):
    assert "toy_hidden_norm" in available_methods()
    HiddenNorm.calls.clear()
    callback = AnchorCallback(AnchorConfig(layers=LAYERS, method=["toy_hidden_norm", "preventative"],
                                           method_weights=[0.5, 1.0]), axis=tiny_axis)
    trainer = _trainer(tiny_tokenizer, tmp_path / "toy", [])
    callback.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback  # ahead of the reporters
    trainer.train()
    plain = _trainer(tiny_tokenizer, tmp_path / "plain", None)
    plain.train()
    assert HiddenNorm.calls == ["step 0", "step 1", "step 2"]
    assert [m.name for m in callback.anchor.methods] == ["toy_hidden_norm", "preventative"]
    assert all("anchor/penalty" in h for h in trainer.state.log_history if "loss" in h)
    assert not torch.equal(_flat(trainer.model), _flat(plain.model))


def test_registering_a_taken_name_or_a_non_method_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Floor", (AnchorMethod,), {"name": "floor"}))
    with pytest.raises(TypeError, match="subclass"):
        register_method(type("NotAMethod", (), {"name": "x"}))


def test_the_sharded_refusal_offers_every_registered_method_that_needs_no_copy(tiny_tokenizer):
    """The methods a sharded full fine-tune can use are read from the registry, so one registered outside the
    package is offered too, and none that reads the frozen base model is."""
    model = make_tiny_model(tiny_tokenizer)
    for p in model.parameters():
        p.ds_id = 0  # how DeepSpeed ZeRO-3 marks the parameters it partitions
    with pytest.raises(ValueError) as refused:
        check_copyable(model, ["kl"])
    offered = str(refused.value).split("need no frozen copy (")[1].split(")")[0].split(", ")
    assert set(offered) == {"ablate", "floor", "incremental", "lm_replay", "preventative", "toy_hidden_norm"}


def test_a_setting_no_chosen_method_reads_is_named(caplog):
    with caplog.at_level(logging.WARNING, logger="anchor.config"):
        AnchorConfig(method=["floor"], steer_coefficient=0.5, replay_batch_size=3)
    assert "steer_coefficient=0.5 has no effect" in caplog.text and "replay_batch_size=3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anchor.config"):
        AnchorConfig(method="preventative+lm_replay", steer_coefficient=0.5, replay_batch_size=3)
    assert caplog.text == ""


def _answers(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, vocab, (2, 10), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 8:] = 0
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[0, 4:] = True
    answer[1, 5:8] = True
    return ids, attention, answer


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _kl(policy: torch.nn.Module, frozen: torch.nn.Module, ids, attention, answer) -> torch.Tensor:
    with torch.no_grad():
        ref = torch.log_softmax(frozen(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), dim=-1)
    logp = torch.log_softmax(policy(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), dim=-1)
    kl = (ref.exp() * (ref - logp)).sum(dim=-1)
    m = answer[:, 1:].float()
    return ((kl * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()


@pytest.mark.parametrize("checkpointing", list(CHECKPOINTING))
def test_kl_gradient_equals_the_explicit_kl_to_the_base_model(tiny_tokenizer, tiny_axis, checkpointing):
    batch, weight = _batch(len(tiny_tokenizer)), 0.8
    ids, attention, answer = _answers(len(tiny_tokenizer))

    def model_with(mode):
        model = make_tiny_model(tiny_tokenizer).train()
        if mode is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode})
        return model

    model = model_with(CHECKPOINTING[checkpointing])
    anchor = Anchor(model, tiny_axis, "kl", LAYERS, weight, reference=Reference(model))
    anchor.method("kl").set_batch(anchor, ids, attention, answer, step=0)
    anchor.start_step(0)
    model(**batch)
    assert anchor.pop_metrics()["kl"][0].item() == pytest.approx(0.0, abs=1e-7)  # still the base model
    _perturb(model)
    model.zero_grad()
    anchor.start_step(1)
    model(**batch).loss.backward()
    injected = torch.cat([p.grad.flatten() for p in model.parameters()])
    anchor.detach()

    model = model_with(CHECKPOINTING[checkpointing])
    frozen = make_tiny_model(tiny_tokenizer).eval()
    _perturb(model)
    explicit_kl = _kl(model, frozen, ids, attention, answer)
    assert float(explicit_kl.detach()) > 1e-4
    (model(**batch).loss + weight * explicit_kl).backward()
    explicit = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float((injected - explicit).norm() / explicit.norm()) <= 1e-6


@pytest.mark.parametrize("method", ["kl", "lm_replay"])
def test_replayed_terms_compute_logits_only_where_an_answer_token_is_predicted(tiny_tokenizer, tiny_axis, method):
    """The LM head runs on the positions from the one predicting the earliest answer token on, not on the prompts
    (the term itself is checked against the whole-batch formula by the gradient tests)."""
    ids, attention, answer = _answers(len(tiny_tokenizer))  # the earliest answer token is at position 4 of 10
    model = make_tiny_model(tiny_tokenizer).train()
    anchor = Anchor(model, tiny_axis, method, LAYERS, 1.0, reference=Reference(model))
    if method == "kl":
        anchor.method(method).set_batch(anchor, ids, attention, answer, step=0)
    else:
        anchor.method(method).set_batch(ids, attention, answer)
    widths: list[int] = []
    model.lm_head.register_forward_hook(lambda module, args, out: widths.append(args[0].shape[1]))
    anchor.start_step(0)
    model(**_batch(len(tiny_tokenizer)))
    anchor.detach()
    assert widths[-1] == 12  # the trained batch: every position
    assert set(widths[:-1]) == {7}  # the replayed batch, and for KL the reference's pass over it


def test_the_extra_token_ratio_counts_the_replayed_tokens_against_every_trained_micro_batch(tiny_tokenizer, tiny_axis):
    """``extra_tokens_ratio``: the tokens of the methods' forwards with gradients (not the reference's) over the
    trainer's, summed over the step's micro-batches: what the anchor adds to a step's compute."""
    ids, attention, answer = _answers(len(tiny_tokenizer))  # 10 + 8 tokens under the attention mask
    batch = _batch(len(tiny_tokenizer))  # 3 x 12 tokens
    model = make_tiny_model(tiny_tokenizer).train()
    with Anchor(model, tiny_axis, "kl", LAYERS, 1.0, reference=Reference(model)) as anchor:
        anchor.method("kl").set_batch(anchor, ids, attention, answer, step=0)
        anchor.start_step(0)
        model(**batch)
        model(**batch)  # a second micro-batch: the replayed batch is not run again
        extra, trained = anchor.pop_metrics()["extra_tokens_ratio"]
    assert (extra.item(), trained.item()) == (18.0, 72.0)


@pytest.mark.parametrize("method", ["kl", "replay"])
def test_on_policy_methods_sample_the_model_and_vanish_at_the_base(tiny_tokenizer, tiny_axis, method):
    """On-policy terms re-sample the current model's answers when due, are 0 while it is the base, and grow after."""
    from anchor.methods import RunContext

    model = make_tiny_model(tiny_tokenizer).train()
    anchor = Anchor(model, tiny_axis, method, LAYERS, 1.0, reference=Reference(model), replay_batch_size=2,
                    replay_max_new_tokens=5, replay_refresh_steps=2)
    anchor.setup(RunContext(model=model, tokenizer=tiny_tokenizer, seed=0))
    metric = "kl" if method == "kl" else "replay_penalty"
    anchor.start_step(0)
    model(**_batch(len(tiny_tokenizer)))
    assert anchor.pop_metrics()[metric][0].item() == pytest.approx(0.0, abs=1e-6)
    sampled = anchor.method(method).state_dict()[0]["input_ids"].clone()
    _perturb(model)
    anchor.start_step(1)  # not due: the same answers
    assert torch.equal(anchor.method(method).state_dict()[0]["input_ids"], sampled)
    model(**_batch(len(tiny_tokenizer))).loss.backward()
    assert anchor.pop_metrics()[metric][0].item() > 1e-5
    anchor.start_step(2)  # due: the moved model answers again
    assert anchor.method(method).state_dict()[1]["step"] == 2
    anchor.detach()


def test_a_checkpoint_of_the_previous_format_is_read_as_the_same_composition(tiny_axis, tmp_path):
    """Format 1 (one method + lm_replay_weight) becomes method [m, lm_replay] with the same weights and state."""
    directory = tmp_path / "anchor"
    tiny_axis.save_pretrained(directory)
    config = {**AnchorConfig().__dict__, "method": "preventative", "lm_replay_weight": 2.0}
    config.pop("method_weights")
    config.pop("lm_replay_data")
    meta = {"format": 1, "step": 4, "config": config, "layers": LAYERS, "tau": {"1": 0.5, "2": 0.25},
            "probes": {"domains": ["meta"], "texts": ["Who are you?"], "prompts": [[1, 2]], "answers": [[3]]},
            "replay_step": 3}
    pool = {"lm_pool.input_ids": torch.ones(2, 3, dtype=torch.long), "lm_pool.attention_mask": torch.ones(2, 3),
            "lm_pool.answer_mask": torch.ones(2, 3), "probe_baseline": torch.zeros(1, 4)}
    save_file(pool, str(directory / "anchor_state.safetensors"))
    (directory / "anchor_state.json").write_text(json.dumps(meta))
    state = load_state(directory)
    assert state.config["method"] == ["preventative", "lm_replay"] and state.config["method_weights"] == [1.0, 2.0]
    assert set(state.method_tensors()) == {"method.lm_replay.pool.input_ids", "method.lm_replay.pool.attention_mask",
                                           "method.lm_replay.pool.answer_mask"}
    assert set(state.probe_tensors()) == {"probe_baseline"} and state.tau == {1: 0.5, 2: 0.25}
    resumed = AnchorConfig(**{k: v for k, v in state.config.items()})
    assert resumed.weights() == {"preventative": 1.0, "lm_replay": 2.0}


@pytest.mark.parametrize("name", ["GRPOTrainer", "RLOOTrainer"])
def test_online_rl_trainers_are_refused_with_the_reason(tiny_tokenizer, tiny_axis, name):
    callback = AnchorCallback(AnchorConfig(layers=LAYERS), axis=tiny_axis)
    callback.trainer = type(name, (), {})()
    with pytest.raises(ValueError, match=f"cannot anchor {name}: it samples completions"):
        callback.on_train_begin(SimpleNamespace(), SimpleNamespace(global_step=0), SimpleNamespace(),
                                model=make_tiny_model(tiny_tokenizer))


def test_kto_trains_with_the_anchor(tiny_tokenizer, tiny_axis, tmp_path):
    from trl import KTOConfig, KTOTrainer

    rows = [{"prompt": [{"role": "user", "content": f"Name a colour {i}"}],
             "completion": [{"role": "assistant", "content": "Blue." if i % 2 else "No " * 3}],
             "label": bool(i % 2)} for i in range(8)]
    callback = AnchorCallback(AnchorConfig(layers=LAYERS, method="floor", floor_percentile=90), axis=tiny_axis)
    args = KTOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                     report_to="none", use_cpu=True, save_strategy="no", bf16=False, disable_tqdm=True)
    model = make_tiny_model(tiny_tokenizer)
    trainer = KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tiny_tokenizer, callbacks=[callback])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "anchor/penalty" in h]
    assert [h["step"] for h in logs] == [1, 2] and all(h["anchor/penalty"] > 0 for h in logs)


def _explicit_edit(method: str, axis, weight: float):
    """The activation edit each steering/ablation method should make, written out."""
    from anchor.methods.ablate import ablation_basis

    def edit(layer: int, h: torch.Tensor) -> torch.Tensor:
        if method == "preventative":
            return h + (-0.3 * float(axis.residual_norm[layer]) * axis.unit[layer]) * weight
        if method == "incremental":
            before = axis.axis[layer - 1] if layer > 0 else torch.zeros_like(axis.axis[layer])
            return h - 0.4 * weight * (axis.axis[layer] - before)
        basis = ablation_basis(axis, layer, 2)
        return h - weight * ((h @ basis.T - basis @ axis.default_mean[layer]) @ basis)

    return edit


@pytest.mark.parametrize("checkpointing", list(CHECKPOINTING))
@pytest.mark.parametrize("method", ["preventative", "incremental", "ablate"])
def test_activation_edits_equal_the_explicit_edit_and_its_gradient(tiny_tokenizer, tiny_axis, method, checkpointing):
    from anchor.hooks import LayerHooks

    batch, weight, mode = _batch(len(tiny_tokenizer)), 0.7, CHECKPOINTING[checkpointing]

    def model_with():
        model = make_tiny_model(tiny_tokenizer).train()
        if mode is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode})
        return model

    model = model_with()
    with Anchor(model, tiny_axis, method, LAYERS, weight, steer_coefficient=0.3, incremental_coefficient=0.4,
                ablate_components=2):
        out = model(**batch)
        out.loss.backward()
    injected, logits = torch.cat([p.grad.flatten() for p in model.parameters()]), out.logits.detach()
    model = model_with()
    layers = range(tiny_axis.n_layers) if method == "incremental" else LAYERS
    with LayerHooks(model, layers, _explicit_edit(method, tiny_axis, weight)):
        out = model(**batch)
        out.loss.backward()
    explicit = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(logits, out.logits.detach(), atol=1e-6)
    assert float((injected - explicit).norm() / explicit.norm()) <= 1e-6
    model.eval()
    with torch.no_grad():
        plain = model(**batch).logits
        with Anchor(model, tiny_axis, method, LAYERS, weight):
            assert torch.equal(model(**batch).logits, plain)  # no edit at inference


def test_incremental_pushes_add_up_to_the_axis_and_ablation_holds_the_default(tiny_axis):
    from anchor.capping import Steer
    from anchor.methods.ablate import ablation_basis

    layers = list(range(tiny_axis.n_layers))
    steer = Steer(None, tiny_axis, -0.5, layers, cumulative=True)
    total = torch.zeros_like(tiny_axis.axis[0])
    for layer in layers:
        total = total + steer.vector(layer, tiny_axis.axis[layer])
        assert torch.allclose(total, -0.5 * tiny_axis.axis[layer], atol=1e-6)  # the push carried at this layer
    basis = ablation_basis(tiny_axis, 2, 3)
    assert torch.allclose(basis @ basis.T, torch.eye(3), atol=1e-5) and float(basis[0] @ tiny_axis.unit[2]) > 0.999
    h = torch.randn(5, tiny_axis.hidden_size)
    edited = h - ((h @ basis.T - basis @ tiny_axis.default_mean[2]) @ basis)
    assert torch.allclose(edited @ basis.T, (basis @ tiny_axis.default_mean[2]).expand(5, 3), atol=1e-5)


def test_replay_every_adds_the_term_n_times_on_every_nth_step_and_nothing_between(tiny_tokenizer, tiny_axis):
    from anchor.loss import answer_lm_loss

    batch, weight, every = _batch(len(tiny_tokenizer)), 0.7, 3
    ids, attention, answer = _answers(len(tiny_tokenizer))

    def grads(step: int | None) -> torch.Tensor:
        """The training gradient with the anchor at ``step`` (None: no anchor)."""
        model = make_tiny_model(tiny_tokenizer).train()
        _perturb(model)
        anchor = None
        if step is not None:
            config = AnchorConfig(method="lm_replay", weight=weight, layers=LAYERS, replay_every=every, probe_every=0)
            anchor = Anchor(model, tiny_axis, config)
            anchor.method("lm_replay").set_batch(ids, attention, answer)
            anchor.start_step(step)
        model(**batch).loss.backward()
        if anchor is not None:
            anchor.detach()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    model = make_tiny_model(tiny_tokenizer).train()
    _perturb(model)
    (model(**batch).loss + every * weight * answer_lm_loss(model(input_ids=ids, attention_mask=attention).logits,
                                                           ids, answer)).backward()
    explicit = torch.cat([p.grad.flatten() for p in model.parameters()])
    plain = grads(None)
    assert float((grads(2 * every) - explicit).norm() / explicit.norm()) <= 1e-6  # due: counted `every` times
    assert torch.equal(grads(2 * every + 1), plain)  # between due steps: bit-identical to no anchor
    with pytest.raises(ValueError, match="replay_every"):
        AnchorConfig(method="lm_replay", replay_every=0)


def test_lm_replay_draws_its_rows_only_on_the_steps_that_use_them(tiny_tokenizer, tiny_axis):
    ids, attention, answer = _answers(len(tiny_tokenizer))
    config = AnchorConfig(method="lm_replay", layers=LAYERS, replay_every=3, replay_batch_size=1, probe_every=0)
    anchor = Anchor(make_tiny_model(tiny_tokenizer), tiny_axis, config)
    replay = anchor.method("lm_replay")
    replay.pool = {"input_ids": ids, "attention_mask": attention, "answer_mask": answer}
    anchor.start_step(4)
    assert not anchor.step_term_due and replay.batch is None
    anchor.start_step(6)
    assert anchor.step_term_due and replay.batch["input_ids"].shape[0] == 1
    anchor.detach()
