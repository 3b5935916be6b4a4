"""Capping and steering on the tiny random Llama: exact maths, generation with a KV cache, batching, dtypes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from anchor.axis import AxisMismatchError
from anchor.capping import (
    DEFAULT_PERCENTILE,
    attach_cap,
    attach_steer,
    band_layers,
    cap,
    default_cap_layers,
    steer,
)
from anchor.hooks import LayerHooks, ProjectionRecorder
from anchor.spans import encode_prompt
from tests.conftest import make_tiny_model

PERCENTILE = 75.0  # high enough that many tokens of the random model fall below the floor


class Reader:
    """Records each layer's output (as the model passes it on) by hooking after any cap or steer."""

    def __init__(self, model, layers):
        self.out: dict[int, torch.Tensor] = {}
        self.hooks = LayerHooks(model, layers, self)

    def __call__(self, layer, hidden):
        self.out[layer] = hidden.detach().clone()


def _ids(tokenizer, question="How do you feel today?"):
    return torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": question}])])


def _proj(axis, hidden, layer):
    return hidden.double() @ axis.unit[layer].double()


def test_default_band_matches_paper_depths(tiny_axis):
    assert band_layers(64, 0.70, 0.85)[0] <= 46 and band_layers(64, 0.70, 0.85)[-1] >= 53
    assert band_layers(80, 0.70, 0.85) == list(range(56, 68))
    assert default_cap_layers(tiny_axis) == [2, 3]
    assert band_layers(4, 0.9, 1.0) == [3]


def test_floor_holds_at_every_capped_layer(tiny_model, tiny_tokenizer, tiny_axis):
    ids = _ids(tiny_tokenizer)
    layers = [1, 2]
    with attach_cap(tiny_model, tiny_axis, layers=layers, percentile=PERCENTILE) as c:
        reader = Reader(tiny_model, layers)
        with torch.no_grad():
            out = tiny_model(ids, output_hidden_states=True)
        reader.hooks.detach()
    assert c.tau == {i: pytest.approx(tiny_axis.tau(i, PERCENTILE)) for i in layers}
    for i in layers:
        proj = _proj(tiny_axis, reader.out[i], i)
        assert (proj >= c.tau[i] - 1e-5 * max(1.0, abs(c.tau[i]))).all(), (i, proj.min(), c.tau[i])
        # hidden_states[i + 1] is the output of layer i (not normed for inner layers) and agrees with the hook
        assert torch.equal(out.hidden_states[i + 1], reader.out[i])
    with torch.no_grad():
        plain = Reader(tiny_model, [layers[0]])
        tiny_model(ids)
        plain.hooks.detach()
    below = _proj(tiny_axis, plain.out[layers[0]], layers[0]) < c.tau[layers[0]]
    assert below.any() and not below.all(), "the test needs tokens on both sides of the floor"


def test_projection_recorder_reads_the_unit_projection_and_copies_each_unit_once(tiny_model, tiny_tokenizer,
                                                                                tiny_axis):
    ids = _ids(tiny_tokenizer)
    layers = [0, 2]
    reader = Reader(tiny_model, layers)
    with ProjectionRecorder(tiny_model, tiny_axis.unit, layers) as rec, torch.no_grad():
        for _ in range(2):
            tiny_model(ids)
            for i in layers:
                assert torch.allclose(rec.proj[i], _proj(tiny_axis, reader.out[i], i).float(), atol=1e-5)
        assert sorted(rec._on_device) == [(i, torch.device("cpu")) for i in layers]  # one copy per layer
    reader.hooks.detach()


def test_tokens_above_floor_bit_identical_and_lift_along_axis(tiny_model, tiny_tokenizer, tiny_axis):
    ids = _ids(tiny_tokenizer)
    layer = 1  # the first capped layer: its input is the same with and without the cap
    plain = Reader(tiny_model, [layer])
    with torch.no_grad():
        tiny_model(ids)
    plain.hooks.detach()
    with cap(tiny_model, tiny_axis, layers=[layer, 2], percentile=PERCENTILE) as c, torch.no_grad():
        capped = Reader(tiny_model, [layer])
        tiny_model(ids)
        capped.hooks.detach()
    before, after = plain.out[layer][0], capped.out[layer][0]
    above = _proj(tiny_axis, before, layer) >= c.tau[layer]
    assert above.any() and (~above).any()
    assert torch.equal(after[above], before[above])
    delta = (after - before)[~above].double()
    unit = tiny_axis.unit[layer].double()
    assert torch.allclose(delta, (delta @ unit)[:, None] * unit, atol=1e-6)  # moved along v̂ only
    assert torch.allclose(_proj(tiny_axis, after[~above], layer), torch.tensor(c.tau[layer]).double(), atol=1e-5)


def test_detach_restores_exact_outputs(tiny_model, tiny_tokenizer, tiny_axis):
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        base = tiny_model(ids).logits
        handle = attach_cap(tiny_model, tiny_axis, layers=[1, 2], percentile=PERCENTILE)
        capped = tiny_model(ids).logits
        handle.detach()
        after = tiny_model(ids).logits
    assert not torch.allclose(base, capped)
    assert torch.equal(base, after)
    assert not handle.attached


def test_kv_cache_decoding_equals_full_forward(tiny_model, tiny_tokenizer, tiny_axis):
    ids = _ids(tiny_tokenizer)
    n_new = 6
    with cap(tiny_model, tiny_axis, layers=[1, 2], percentile=PERCENTILE), torch.no_grad():
        gen = tiny_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
        full = tiny_model(gen.sequences).logits[0]
        # manual incremental decoding over the same tokens
        out = tiny_model(ids, use_cache=True)
        steps, past = [out.logits[0, -1]], out.past_key_values
        for t in range(ids.shape[1], gen.sequences.shape[1] - 1):
            out = tiny_model(gen.sequences[:, t:t + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits[0, -1])
            past = out.past_key_values
    stepped = torch.stack([x[0] for x in gen.logits])
    expected = full[ids.shape[1] - 1:-1]
    assert torch.allclose(stepped, expected, atol=1e-5)
    assert torch.allclose(torch.stack(steps), expected, atol=1e-5)
    with torch.no_grad():
        uncapped = tiny_model(gen.sequences).logits[0]
    assert not torch.allclose(uncapped, full, atol=1e-3)  # the cap did act during generation


def test_left_padded_batch_equals_single_rows(tiny_model, tiny_tokenizer, tiny_axis):
    rows = [_ids(tiny_tokenizer, q)[0] for q in ("Who are you?", "Tell me about the sea and the sky, please.")]
    width = max(len(r) for r in rows)
    pad = tiny_tokenizer.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]).long() for r in rows])
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with cap(tiny_model, tiny_axis, layers=[1, 2], percentile=PERCENTILE), torch.no_grad():
        batch = tiny_model.generate(ids, attention_mask=mask, **kwargs)
        singles = [tiny_model.generate(r[None], attention_mask=torch.ones_like(r[None]), **kwargs) for r in rows]
    for b, single in enumerate(singles):
        assert torch.equal(batch.sequences[b, width:], single.sequences[0, len(rows[b]):])
        for step_batch, step_single in zip(batch.logits, single.logits, strict=True):
            assert torch.allclose(step_batch[b], step_single[0], atol=1e-4)


def test_steering_sign_and_norm_scaling(tiny_model, tiny_tokenizer, tiny_axis):
    ids = _ids(tiny_tokenizer)
    layer = tiny_axis.report_layer
    with torch.no_grad():
        plain = Reader(tiny_model, [layer])
        base = tiny_model(ids).logits
        plain.hooks.detach()
    for coeff in (0.5, -0.25):
        with steer(tiny_model, tiny_axis, coeff) as s, torch.no_grad():
            assert s.layers == [layer]
            read = Reader(tiny_model, [layer])
            tiny_model(ids)
            read.hooks.detach()
        expected = coeff * float(tiny_axis.residual_norm[layer])
        assert s.shift[layer] == pytest.approx(expected)
        diff = read.out[layer] - plain.out[layer]
        lift = _proj(tiny_axis, diff, layer)
        assert torch.allclose(lift, torch.full_like(lift, expected), rtol=1e-5, atol=1e-6)
        assert torch.allclose(diff.double().norm(dim=-1), torch.full_like(lift, abs(expected)), rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, base)  # leaving the block removed the push
    handle = attach_steer(tiny_model, tiny_axis, 1.0, layers=[0, 3])
    assert handle.layers == [0, 3]
    handle.detach()


def test_peft_lora_model(tiny_model, tiny_tokenizer, tiny_axis):
    from peft import LoraConfig, get_peft_model

    ids = _ids(tiny_tokenizer)
    with cap(tiny_model, tiny_axis, layers=[1, 2], percentile=PERCENTILE), torch.no_grad():
        base_capped = tiny_model(ids).logits
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with cap(peft_model, tiny_axis, layers=[1, 2], percentile=PERCENTILE) as c, torch.no_grad():
        read = Reader(peft_model, [2])
        capped = peft_model(ids).logits
        read.hooks.detach()
    assert torch.allclose(capped, base_capped, atol=1e-6)  # LoRA starts as the identity
    assert (_proj(tiny_axis, read.out[2], 2) >= c.tau[2] - 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(tiny_model, tiny_tokenizer, tiny_axis, dtype):
    ids = _ids(tiny_tokenizer)
    model = tiny_model.to(dtype)
    layer = 1
    with torch.no_grad():
        plain = Reader(model, [layer])
        model(ids)
        plain.hooks.detach()
        # fp16 weights round to a different bf16 fingerprint than fp32 ones (double rounding), so skip that check
        with cap(model, tiny_axis, layers=[layer], percentile=PERCENTILE, check_weights=False) as c:
            read = Reader(model, [layer])
            logits = model(ids).logits
            read.hooks.detach()
    before, after = plain.out[layer][0], read.out[layer][0]
    assert after.dtype == dtype and torch.isfinite(logits).all()
    above = _proj(tiny_axis, before.float(), layer) >= c.tau[layer]
    assert torch.equal(after[above], before[above])
    # within the rounding of one element of this dtype at the hidden state's scale
    tol = torch.finfo(dtype).eps * float(after.float().abs().max()) * 4
    assert (_proj(tiny_axis, after.float(), layer) >= c.tau[layer] - tol).all()


def test_calibrated_setting_is_the_default(tiny_model, tiny_axis):
    calibrated = dataclasses.replace(
        tiny_axis, metadata={**tiny_axis.metadata, "cap": {"layers": [1], "percentile": 60.0, "tau": {}}},
    )
    with cap(tiny_model, calibrated) as c:
        assert c.layers == [1] and c.percentile == 60.0
        assert c.tau[1] == pytest.approx(tiny_axis.tau(1, 60.0))
    with cap(tiny_model, tiny_axis) as c:
        assert c.layers == default_cap_layers(tiny_axis) and c.percentile == DEFAULT_PERCENTILE


def test_explicit_tau(tiny_model, tiny_axis):
    with cap(tiny_model, tiny_axis, layers=[0, 1], tau=0.5) as c:
        assert c.tau == {0: 0.5, 1: 0.5} and c.percentile is None
    with cap(tiny_model, tiny_axis, tau={2: 1.0, 3: -1.0}) as c:
        assert c.layers == [2, 3] and c.tau == {2: 1.0, 3: -1.0}


def test_bad_arguments_raise_clear_errors(tiny_model, tiny_tokenizer, tiny_axis):
    with pytest.raises(ValueError, match="out of range"):
        attach_cap(tiny_model, tiny_axis, layers=[2, 9])
    with pytest.raises(ValueError, match=r"0\.\.100"):
        attach_cap(tiny_model, tiny_axis, percentile=150)
    with pytest.raises(ValueError, match="not both"):
        attach_cap(tiny_model, tiny_axis, tau=1.0, percentile=50)
    with pytest.raises(ValueError, match="no floor for layers"):
        attach_cap(tiny_model, tiny_axis, layers=[1, 2], tau={1: 0.0})
    with pytest.raises(ValueError, match="out of range"):
        attach_steer(tiny_model, tiny_axis, 1.0, layers=[-1])
    with pytest.raises(ValueError, match="finite"):
        attach_steer(tiny_model, tiny_axis, float("nan"))
    with pytest.raises(AxisMismatchError, match="layers"):
        attach_cap(make_tiny_model(tiny_tokenizer, n_layers=3), tiny_axis)
    other = make_tiny_model(tiny_tokenizer, seed=1)
    with pytest.raises(AxisMismatchError, match="fingerprint"):
        attach_cap(other, tiny_axis)
    attach_cap(other, tiny_axis, check_weights=False).detach()
    # a failed attach leaves no hooks behind
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, make_tiny_model(tiny_tokenizer)(ids).logits)
