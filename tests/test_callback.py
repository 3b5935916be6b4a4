"""AnchorCallback with real TRL trainers on the tiny model: invariances, resume, metrics sinks, refusals; probes."""

from __future__ import annotations

import glob
import json
import logging
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from anchor.axis import AxisMismatchError
from anchor.callback import AnchorCallback, AnchorConfig
from anchor.engine import Anchor, NonFiniteError
from anchor.probes import answer_nll, drift_scores, generate_answers, preserved_rng, role_likeness
from anchor.spans import encode_prompt
from tests.conftest import make_tiny_model

LAYERS = [1, 2]



def _sft_data(n: int = 16) -> Dataset:
    rows = [{"messages": [{"role": "user", "content": f"Is Paris the capital of France? {i}"},
                          {"role": "assistant", "content": "Yes, Paris is the capital. " * (1 + i % 3)}]}
            for i in range(n)]
    return Dataset.from_list(rows)


def _dpo_data(n: int = 8) -> Dataset:
    rows = [{"prompt": [{"role": "user", "content": f"Name three primary colours {i}"}],
             "chosen": [{"role": "assistant", "content": "Red, yellow and blue."}],
             "rejected": [{"role": "assistant", "content": "No " * (1 + i % 3)}]} for i in range(n)]
    return Dataset.from_list(rows)


def _common(tmp_path: Path, **overrides) -> dict:
    args = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", dataloader_num_workers=0,
                disable_tqdm=True, seed=0, bf16=False)
    args.update(overrides)
    return args


def _sft(tokenizer, tmp_path, callbacks, model=None, **overrides):
    from trl import SFTConfig, SFTTrainer

    model = model if model is not None else make_tiny_model(tokenizer)
    return SFTTrainer(model=model, args=SFTConfig(**_common(tmp_path, **overrides)), train_dataset=_sft_data(),
                      processing_class=tokenizer, callbacks=callbacks)


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory) -> str:
    """Four probes, one per domain: the shipped 64 would cost seconds per probe step on the CPU."""
    path = tmp_path_factory.mktemp("probes") / "probes.json"
    domains = ("coding", "writing", "emotional", "meta")
    probes = [{"domain": d, "prompt": f"Tell me something about {d}."} for d in domains]
    path.write_text(json.dumps({"version": 1, "probes": probes}))
    return str(path)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _anchor_logs(trainer) -> list[dict]:
    return [{k: v for k, v in h.items() if k.startswith("anchor/") or k == "step"} for h in trainer.state.log_history
            if any(k.startswith("anchor/") for k in h)]


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


def test_config_parses_with_trl_parser_next_to_trainer_configs():
    from trl import DPOConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    argv = ["--output_dir", "x", "--use_cpu", "--axis", "bundle/", "--layers", "3", "4", "--method", "match",
            "--weight", "0.5", "--floor_percentile", "20", "--probe_every", "10", "--replay_layers", "4", "5"]
    for trainer_config in (SFTConfig, DPOConfig):
        parser = TrlParser((ScriptArguments, trainer_config, ModelConfig, AnchorConfig))
        *_, anchor = parser.parse_args_and_config(args=argv)
        assert anchor == AnchorConfig(axis="bundle/", layers=[3, 4], method="match", weight=0.5, floor_percentile=20,
                                      probe_every=10, replay_layers=[4, 5])
        assert all(f.metadata.get("help") for f in AnchorConfig.__dataclass_fields__.values())


@pytest.mark.parametrize("bad", [{"method": "ceiling"}, {"probe_mode": "sometimes"}, {"floor_percentile": 101},
                                 {"probes_per_domain": 0}, {"method_weights": [-1.0]},
                                 {"weight": float("nan")}, {"steer_coefficient": float("inf")}, {"layers": []},
                                 {"method": ["floor", "floor"]}, {"method": ["floor"], "method_weights": [1.0, 2.0]},
                                 {"lm_replay_pool": 0}, {"replay_questions": []},
                                 {"replay_questions": ["fine", " "]},
                                 {"weight": -1}, {"replay_refresh_steps": 0}])
def test_config_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="AnchorConfig"):
        AnchorConfig(**bad)


# ----------------------------------------------------------------------------------------------------------------
# Training invariances
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["floor", "match", "replay", "preventative", "kl"])
def test_weight_zero_is_bit_identical_to_no_callback(tiny_tokenizer, tiny_axis, tmp_path, method, probe_file):
    config = AnchorConfig(layers=LAYERS, method=[method, "lm_replay"], weight=0.0, probe_every=2,
                          probe_mode="generated", probe_max_new_tokens=6, steer_coefficient=3.0, probe_file=probe_file,
                          lm_replay_pool=4, replay_max_new_tokens=4)
    plain = _sft(tiny_tokenizer, tmp_path / "plain", None, gradient_checkpointing=True)
    plain.train()
    anchored = _sft(tiny_tokenizer, tmp_path / "anchored", [AnchorCallback(config, axis=tiny_axis)],
                    gradient_checkpointing=True)
    anchored.train()
    assert torch.equal(_flat(plain.model), _flat(anchored.model))
    assert [h.get("loss") for h in plain.state.log_history] == [h.get("loss") for h in anchored.state.log_history]
    assert any("anchor/probe_drift" in h for h in anchored.state.log_history)  # probes ran and sampled


@pytest.mark.parametrize("methods", [["floor"], ["match"], ["replay"], ["preventative"], ["lm_replay"], ["kl"],
                                     ["preventative", "lm_replay"]], ids="+".join)
def test_gradient_accumulation_invariance(tiny_tokenizer, tiny_axis, tmp_path, methods):
    config = AnchorConfig(layers=LAYERS, method=methods, weight=5.0, floor_percentile=90, steer_coefficient=2.0,
                          replay_batch_size=2, replay_max_new_tokens=4, replay_refresh_steps=2, lm_replay_pool=4)
    common = dict(max_steps=3, optim="sgd", learning_rate=0.5, gradient_checkpointing=False)
    split = _sft(tiny_tokenizer, tmp_path / "split", [AnchorCallback(config, axis=tiny_axis)],
                 per_device_train_batch_size=2, gradient_accumulation_steps=2, **common)
    split.train()
    whole = _sft(tiny_tokenizer, tmp_path / "whole", [AnchorCallback(config, axis=tiny_axis)],
                 per_device_train_batch_size=4, gradient_accumulation_steps=1, **common)
    whole.train()
    plain = _sft(tiny_tokenizer, tmp_path / "plain", None, per_device_train_batch_size=4, **common)
    plain.train()
    a, b, c = _flat(split.model), _flat(whole.model), _flat(plain.model)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert (b - c).abs().max() > 1000 * (a - b).abs().max()  # the anchor moved the weights; GA did not


# ----------------------------------------------------------------------------------------------------------------
# DPO with a LoRA adapter and no ref_model: the reference pass runs the same hooked modules
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("methods", [["floor"], ["match"], ["replay"], ["preventative"], ["lm_replay"], ["kl"],
                                     ["preventative", "lm_replay"]], ids="+".join)
def test_dpo_peft_reference_pass_is_excluded(tiny_tokenizer, tiny_axis, tmp_path, monkeypatch, probe_file, methods):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    penalised, forwards = [], []
    original = Anchor._penalise

    def spy(self, layer, hidden):
        penalised.append((layer, self._is_reference_pass()))
        return original(self, layer, hidden)

    monkeypatch.setattr(Anchor, "_penalise", spy)
    model = make_tiny_model(tiny_tokenizer)
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    steps = 2
    callback = AnchorCallback(AnchorConfig(layers=LAYERS, method=methods, weight=1.0, probe_every=2,
                                           probe_max_new_tokens=6, probe_far_roles=2, probe_file=probe_file,
                                           replay_batch_size=2, replay_max_new_tokens=4, lm_replay_pool=4),
                              axis=tiny_axis)
    trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(**_common(tmp_path, max_steps=steps)),
                         train_dataset=_dpo_data(), processing_class=tiny_tokenizer, callbacks=[callback],
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    hooked = sorted(set(LAYERS).union(*callback.anchor.method_layers.values()))
    assert penalised == [(layer, False) for _ in range(steps) for layer in hooked]  # policy passes only, once each
    assert len(forwards) >= 2 * steps  # the reference pass did run through the hooked model
    logs = _anchor_logs(trainer)
    assert [h["step"] for h in logs] == [1, 2] and all("anchor/proj/layer_1" in h for h in logs)
    penalty = "penalty" if {"floor", "match"} & set(methods) else None
    assert penalty is None or all(f"anchor/{penalty}" in h for h in logs)
    assert "anchor/role_likeness" in logs[-1] and "anchor/probe_drift/emotional" in logs[-1]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ----------------------------------------------------------------------------------------------------------------

ON_THE_FLY = dict(axis_n_roles=2, axis_n_questions=2, axis_max_new_tokens=4, axis_batch_size=8)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "lm_replay_weight"), [("floor", 0.0), ("replay", 0.0), ("preventative", 1.0),
                                                        ("match", 0.0), ("kl", 0.0)])
def test_resume_is_bit_exact_and_never_recomputes_the_axis(tiny_tokenizer, tmp_path, monkeypatch, method,
                                                            lm_replay_weight, probe_file):
    monkeypatch.setenv("ANCHOR_CACHE", str(tmp_path / "cache"))
    methods = [method, "lm_replay"] if lm_replay_weight else [method]
    config = AnchorConfig(layers=LAYERS, method=methods, weight=2.0, floor_percentile=90, probe_every=2,
                          probe_max_new_tokens=6, replay_batch_size=2, replay_refresh_steps=3,
                          replay_max_new_tokens=6, probe_file=probe_file,
                          method_weights=[1.0, lm_replay_weight] if lm_replay_weight else None,
                          lm_replay_pool=5, steer_coefficient=0.5, **ON_THE_FLY)
    common = dict(max_steps=6, save_strategy="steps", save_steps=2)
    # a full fine-tune resumed with replay reloads its frozen reference from config._name_or_path
    make_tiny_model(tiny_tokenizer).save_pretrained(tmp_path / "base")

    def base():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(tmp_path / "base")

    first = AnchorCallback(config)
    straight = _sft(tiny_tokenizer, tmp_path / "a", [first], model=base(), **common)
    straight.train()
    state = tmp_path / "a" / "out" / "checkpoint-2" / "anchor"
    assert {p.name for p in state.iterdir()} >= {"axis.safetensors", "axis_config.json", "anchor_state.json",
                                                  "anchor_state.safetensors"}

    def refuse(*_a, **_k):
        raise AssertionError("the axis was recomputed on resume")

    monkeypatch.setattr("anchor.axis.compute_axis", refuse)
    second = AnchorCallback(config)
    resumed = _sft(tiny_tokenizer, tmp_path / "b", [second], model=base(), **common)  # another output_dir
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))

    assert torch.equal(_flat(straight.model), _flat(resumed.model))
    assert torch.equal(first.axis.axis, second.axis.axis) and first.anchor.tau == second.anchor.tau
    assert torch.equal(first.probes.baseline, second.probes.baseline)
    assert _anchor_logs(straight) == _anchor_logs(resumed)  # steps 1-2 restored with the checkpoint, 3-6 re-run
    if lm_replay_weight:
        pools = [cb.anchor.method("lm_replay").pool for cb in (first, second)]
        assert all(torch.equal(pools[0][k], pools[1][k]) for k in pools[0])
        assert all("anchor/lm_replay_loss" in h for h in _anchor_logs(straight))


def test_anchor_state_is_written_inside_the_trainers_save_before_its_state(tiny_tokenizer, tiny_axis, tmp_path,
                                                                          monkeypatch):
    """A kill between the trainer's save and a later hook cannot leave a resumable checkpoint without anchor state:
    the anchor folder is complete before ``trainer_state.json``, the file a resume reads, is written."""
    from transformers import TrainerState

    seen = []
    original = TrainerState.save_to_json

    def spy(self, json_path):
        seen.append((Path(json_path).parent / "anchor" / "anchor_state.json").is_file())
        return original(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", spy)
    _sft(tiny_tokenizer, tmp_path, [AnchorCallback(AnchorConfig(layers=LAYERS), axis=tiny_axis)], max_steps=4,
         save_strategy="steps", save_steps=2).train()
    assert seen == [True, True]


def test_resume_refuses_to_start_lm_replay_midway(tiny_tokenizer, tiny_axis, tmp_path):
    common = dict(max_steps=2, save_strategy="steps", save_steps=2)
    _sft(tiny_tokenizer, tmp_path / "a", [AnchorCallback(AnchorConfig(layers=LAYERS, method=["floor"]),
                                                         axis=tiny_axis)], **common).train()
    config = AnchorConfig(layers=LAYERS, method=["floor", "lm_replay"])
    resumed = _sft(tiny_tokenizer, tmp_path / "b", [AnchorCallback(config, axis=tiny_axis)], max_steps=4)
    refusal = r"trained with AnchorConfig.method=\['floor'\], this run has \['floor', 'lm_replay'\]"
    with pytest.raises(ValueError, match=refusal):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))


def test_resume_without_anchor_state_refuses_to_recompute_the_axis(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHOR_CACHE", str(tmp_path / "cache"))
    plain = _sft(tiny_tokenizer, tmp_path / "a", None, max_steps=2, save_strategy="steps", save_steps=2)
    plain.train()
    resumed = _sft(tiny_tokenizer, tmp_path / "b", [AnchorCallback(AnchorConfig(**ON_THE_FLY))], max_steps=4)
    with pytest.raises(RuntimeError, match="half-trained"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))


# ----------------------------------------------------------------------------------------------------------------
# Metrics: present once per log, at the right step, in every reporter
# ----------------------------------------------------------------------------------------------------------------


def _wandb_history(run_file: str) -> list[dict]:
    """History rows of an offline ``.wandb`` file."""
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for record in _wandb_records(run_file) if record.WhichOneof("record_type") == "history"]


def _wandb_records(run_file: str) -> list:
    """Records of an offline ``.wandb`` file: a LevelDB-style log (32 KiB blocks, 7-byte headers) of protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, rows, buf = Path(run_file).read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = payload if kind in (1, 2) else buf + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            rows.append(record)
    return rows


@pytest.mark.slow
def test_metrics_reach_wandb_and_tensorboard(tiny_tokenizer, tiny_axis, tmp_path, monkeypatch, probe_file):
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    callback = AnchorCallback(AnchorConfig(layers=LAYERS, method=["floor"], weight=1.0, probe_every=2,
                                           probe_max_new_tokens=6, probe_file=probe_file), axis=tiny_axis)
    trainer = _sft(tiny_tokenizer, tmp_path, [callback], max_steps=4, report_to=["wandb", "tensorboard"])
    trainer.train()
    wandb.finish()
    expected = {h["step"]: h for h in _anchor_logs(trainer)}
    assert sorted(expected) == [1, 2, 3, 4]

    run_file = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))[0]
    for _ in range(60):  # wandb's service process may still be writing the file when finish() returns
        history = _wandb_history(run_file)
        logged = {row["train/global_step"]: row for row in history if "train/anchor/penalty" in row}
        if len(logged) == 4:
            break
        time.sleep(0.5)
    assert sorted(logged) == [1, 2, 3, 4]
    for step, row in logged.items():
        assert row["train/anchor/penalty"] == pytest.approx(expected[step]["anchor/penalty"])
        assert row["train/anchor/proj/layer_2"] == pytest.approx(expected[step]["anchor/proj/layer_2"])
    assert sorted(s for s, row in logged.items() if "train/anchor/probe_drift/coding" in row) == [2, 4]

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("train/anchor/penalty")
    assert [e.step for e in scalars] == [1, 2, 3, 4]
    assert [e.value for e in scalars] == pytest.approx([expected[s]["anchor/penalty"] for s in (1, 2, 3, 4)])
    assert [e.step for e in events.Scalars("train/anchor/probe_drift")] == [2, 4]


@pytest.mark.slow
def test_wandb_shows_the_probe_answers_the_axis_and_a_drift_chart(tiny_tokenizer, tiny_axis, tmp_path, monkeypatch,
                                                                  probe_file):
    import wandb

    wandb.teardown()  # wandb reads its environment once per process; an earlier test's run must not count
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    callback = AnchorCallback(AnchorConfig(layers=LAYERS, probe_every=2, probe_max_new_tokens=6,
                                           probe_file=probe_file), axis=tiny_axis)
    trainer = _sft(tiny_tokenizer, tmp_path, [callback], max_steps=4, report_to=["wandb"])
    trainer.train()
    wandb.finish()
    run_dir = Path(glob.glob(str(tmp_path / "wandb" / "offline-run-*"))[0])
    run_file = next(run_dir.glob("run-*.wandb"))
    for _ in range(60):  # wandb's service process may still be writing the file when finish() returns
        records = _wandb_records(str(run_file))
        history = _wandb_history(str(run_file))
        tables = {row["train/global_step"]: {k.rsplit("/", 1)[1]: v for k, v in row.items()
                                             if k.startswith("anchor/probe_answers/")}
                  for row in history if "anchor/probe_answers/_type" in row}
        charts = [k for row in history for k in row if k.startswith("anchor/probe_drift_chart")]
        artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
        if len(tables) == 2 and charts and artifacts:
            break
        time.sleep(0.5)
    assert sorted(tables) == [2, 4] and all(t["_type"] == "table-file" for t in tables.values())
    table = json.loads((run_dir / "files" / tables[4]["path"]).read_text())
    assert table["columns"] == ["step", "domain", "prompt", "answer", "projection_change", "role_likeness"]
    assert len(table["data"]) == 4 and {row[1] for row in table["data"]} == {"coding", "writing", "emotional", "meta"}
    assert charts
    assert artifacts[0].type == "axis" and artifacts[0].name.startswith("assistant-axis-")
    assert {f.path for f in artifacts[0].manifest.contents} >= {"axis.safetensors", "axis_config.json"}


@pytest.mark.slow
def test_probes_are_logged_at_their_own_steps(tiny_tokenizer, tiny_axis, tmp_path):
    callback = AnchorCallback(AnchorConfig(layers=LAYERS, weight=1.0, probe_every=2, probe_max_new_tokens=6,
                                           probe_mode="generated", weight_warmup_steps=2), axis=tiny_axis)
    trainer = _sft(tiny_tokenizer, tmp_path, [callback], max_steps=4, logging_steps=3)
    trainer.train()
    logs = _anchor_logs(trainer)
    assert [h["step"] for h in logs] == [2, 3, 4]  # steps 2 and 4 forced by the probes, 3 by logging_steps
    assert [("anchor/probe_drift" in h) for h in logs] == [True, False, True]
    assert [h["anchor/weight"] for h in logs] == [0.5, 1.0, 1.0]  # λ ramps over weight_warmup_steps=2
    assert set(callback.probes.probes.domains) == {"coding", "writing", "emotional", "meta"}


def test_nonfinite_projections_stop_the_run_before_a_checkpoint(tiny_tokenizer, tiny_axis):
    """A NaN projection (or term) stops the run at the end of its step, naming what turned non-finite, and the
    share of bad tokens is still logged."""
    callback = AnchorCallback(AnchorConfig(layers=LAYERS))
    callback.anchor = Anchor(make_tiny_model(tiny_tokenizer), tiny_axis, "floor", LAYERS)
    callback.anchor.add_metric("nonfinite", torch.tensor(3.0), 12.0)
    callback.anchor._count_nonfinite("the projection at layer 2", torch.tensor(True))
    with pytest.raises(NonFiniteError, match=r"projection at layer 2 turned NaN/Inf at step 7"):
        callback.on_step_end(SimpleNamespace(), SimpleNamespace(global_step=7), SimpleNamespace())
    logs = {"loss": 1.0}
    callback.on_log(SimpleNamespace(), SimpleNamespace(global_step=7, log_history=[]), SimpleNamespace(), logs=logs)
    assert logs["anchor/nonfinite"] == pytest.approx(0.25)
    with pytest.raises(RuntimeError, match="training loss is nan at step 7"):
        callback.on_log(SimpleNamespace(), SimpleNamespace(global_step=7, log_history=[]), SimpleNamespace(),
                        logs={"loss": float("nan")})
    callback.anchor.detach()


# ----------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------


def test_refuses_an_axis_of_another_architecture(tiny_tokenizer, tiny_axis, tmp_path):
    model = make_tiny_model(tiny_tokenizer, hidden=48)
    trainer = _sft(tiny_tokenizer, tmp_path, [AnchorCallback(AnchorConfig(layers=LAYERS), axis=tiny_axis)],
                   model=model)
    with pytest.raises(AxisMismatchError, match="hidden size"):
        trainer.train()


def test_refuses_an_axis_of_other_weights_unless_told_it_is_a_fine_tune(tiny_tokenizer, tiny_axis, tmp_path):
    other = make_tiny_model(tiny_tokenizer, seed=1)
    trainer = _sft(tiny_tokenizer, tmp_path, [AnchorCallback(AnchorConfig(layers=LAYERS), axis=tiny_axis)],
                   model=other)
    with pytest.raises(AxisMismatchError, match="check_weights=False"):
        trainer.train()
    config = AnchorConfig(layers=LAYERS, axis_check_weights=False)
    _sft(tiny_tokenizer, tmp_path, [AnchorCallback(config, axis=tiny_axis)], model=other, max_steps=1).train()


def test_refuses_layers_out_of_range(tiny_tokenizer, tiny_axis, tmp_path):
    trainer = _sft(tiny_tokenizer, tmp_path, [AnchorCallback(AnchorConfig(layers=[2, 9]), axis=tiny_axis)])
    with pytest.raises(ValueError, match=r"AnchorConfig.layers.*\[9\].*4 decoder layers"):
        trainer.train()


def test_refuses_probes_without_a_chat_template(tiny_tokenizer, tiny_axis):
    callback = AnchorCallback(AnchorConfig(layers=LAYERS, probe_every=5), axis=tiny_axis)
    tokenizer = SimpleNamespace(chat_template=None, pad_token_id=0)
    args = SimpleNamespace(output_dir="x", gradient_accumulation_steps=1, seed=0, process_index=0)
    with pytest.raises(ValueError, match="chat template"):
        callback.on_train_begin(args, SimpleNamespace(global_step=0), SimpleNamespace(),
                                model=make_tiny_model(tiny_tokenizer), processing_class=tokenizer)


@pytest.mark.parametrize(("args", "message"), [
    ({"torch_compile": True}, "torch.compile"),
    ({"fp16": True, "deepspeed": "ds.json"}, "DeepSpeed's fp16"),
])
def test_refuses_trainer_settings_it_cannot_anchor(tiny_tokenizer, tiny_axis, args, message):
    callback = AnchorCallback(AnchorConfig(layers=LAYERS), axis=tiny_axis)
    with pytest.raises(ValueError, match=message):
        callback.on_train_begin(SimpleNamespace(**args), SimpleNamespace(global_step=0), SimpleNamespace(),
                                model=make_tiny_model(tiny_tokenizer))


def test_refuses_a_model_without_decoder_layers(tiny_axis):
    callback = AnchorCallback(AnchorConfig(layers=LAYERS), axis=tiny_axis)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = SimpleNamespace(model_type="mlp")
    with pytest.raises(ValueError, match="layers_path"):
        callback.on_train_begin(SimpleNamespace(), SimpleNamespace(global_step=0), SimpleNamespace(), model=model)


# ----------------------------------------------------------------------------------------------------------------
# Probe maths
# ----------------------------------------------------------------------------------------------------------------


def test_drift_scores_by_hand():
    baseline = torch.tensor([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0], [12.0, float("nan")]])
    current = baseline - torch.tensor([[1.0, 2.0]])  # every probe moved down by 1 (layer 0) and 2 (layer 1)
    scores = drift_scores(current, baseline, ["a", "a", "b", "b"])
    sd = 2**0.5  # std of (1, 3), of (0, 2) and of (10, 12)
    overall_layer1 = float(torch.tensor([0.0, 2.0, 10.0]).std())  # "b" has one value at layer 1: the overall spread
    assert scores["a"] == pytest.approx((-1 / sd - 2 / sd) / 2)
    assert scores["b"] == pytest.approx((-1 / sd - 2 / overall_layer1) / 2)
    overall_layer0 = float(torch.tensor([1.0, 3.0, 10.0, 12.0]).std())
    assert scores[""] == pytest.approx((-1 / overall_layer0 - 2 / overall_layer1) / 2)


def test_answer_nll_matches_cross_entropy(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer)
    prompts, answers = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13]]
    got = answer_nll(model, prompts, answers, pad_id=tiny_tokenizer.pad_token_id)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        expected = torch.nn.functional.cross_entropy(logits[len(p) - 1:-1], torch.tensor(a))
        assert got[i].item() == pytest.approx(expected.item(), rel=1e-5)


def test_role_likeness_is_default_minus_role_nll(tiny_tokenizer):
    from anchor.spans import encode_prompt

    model = make_tiny_model(tiny_tokenizer)
    texts, answers = ["Who are you?"], [[40, 41, 42]]
    score = role_likeness(model, tiny_tokenizer, texts, answers, ["You are a pirate captain."])
    default = answer_nll(model, [encode_prompt(tiny_tokenizer, [{"role": "user", "content": texts[0]}])], answers)
    role = answer_nll(model, [encode_prompt(tiny_tokenizer, [{"role": "system", "content": "You are a pirate captain."},
                                                             {"role": "user", "content": texts[0]}])], answers)
    assert score.item() == pytest.approx((default - role).item(), abs=1e-6)


def test_sampling_probes_leave_training_randomness_and_mode_alone(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer).train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with preserved_rng():
        torch.rand(7)
    answers = generate_answers(model, tiny_tokenizer, [[5, 6, 7]], max_new_tokens=4, sample=True, seed=9)
    assert torch.equal(torch.rand(3), expected)
    assert model.training
    assert answers == generate_answers(model, tiny_tokenizer, [[5, 6, 7]], max_new_tokens=4, sample=True, seed=9)


def test_default_layers_are_announced_with_the_reason(tiny_tokenizer, tiny_axis, tmp_path, caplog):
    from anchor.engine import default_layers
    from anchor.methods.preventative import middle_third

    trainer = _sft(tiny_tokenizer, tmp_path, [AnchorCallback(AnchorConfig(probe_every=0), axis=tiny_axis)],
                   max_steps=1)
    with caplog.at_level(logging.INFO, logger="anchor.callback"):
        trainer.train()
    line = next(r.getMessage() for r in caplog.records if "method=preventative+kl at layers" in r.getMessage())
    assert str(default_layers(tiny_axis)) in line and "highest mean |cosine(axis, PC1)|" in line
    # preventative steers the middle third of the network when no layers are given, and says so
    assert f"preventative at its own layers {middle_third(tiny_axis.n_layers)}" in line


def test_layers_out_of_range_are_refused_by_their_field_name_before_training(tiny_tokenizer, tiny_axis, tmp_path):
    model = make_tiny_model(tiny_tokenizer)
    before = _flat(model)
    trainer = _sft(tiny_tokenizer, tmp_path, [AnchorCallback(AnchorConfig(layers=[1, 9]), axis=tiny_axis)],
                   model=model, max_steps=1)
    with pytest.raises(ValueError, match=r"AnchorConfig.layers: layers \[9\] are out of range"):
        trainer.train()
    assert torch.equal(_flat(model), before)


def test_the_default_on_a_sharded_full_fine_tune_is_refused_with_the_fix_before_the_axis(tiny_tokenizer, tmp_path,
                                                                                        monkeypatch):
    """The default's KL needs a frozen copy of the model, which ZeRO-3/FSDP cannot give: refused in seconds, naming the
    methods that need none, before the on-the-fly axis (minutes on a real model) is computed."""
    def no_axis(*_args, **_kwargs):
        raise AssertionError("the axis was computed before the refusal")

    monkeypatch.setattr(AnchorCallback, "_load_axis", no_axis)
    model = make_tiny_model(tiny_tokenizer)
    before = _flat(model)
    for p in model.parameters():
        p.ds_id = 0  # how DeepSpeed ZeRO-3 marks the parameters it partitions (anchor.reference.is_zero3)
    trainer = _sft(tiny_tokenizer, tmp_path, [AnchorCallback(AnchorConfig())], model=model, max_steps=1)
    with pytest.raises(ValueError, match=r"method\(s\) \['preventative', 'kl'\] compare\(s\) with the frozen base "
                                         r"model.*ZeRO-3, FSDP.*method=\[\"preventative\", \"lm_replay\"\]"):
        trainer.train()
    assert torch.equal(_flat(model), before)


@pytest.mark.parametrize("method", ["floor", "match"])
def test_bf16_autocast_on_cpu_trains_with_finite_anchor_metrics(tiny_tokenizer, tiny_axis, tmp_path, method):
    """Under the trainer's bf16 autocast the penalty is read in fp32 and the reference runs at the same precision."""
    config = AnchorConfig(layers=LAYERS, method=method, weight=1.0, floor_percentile=100, probe_every=0)
    trainer = _sft(tiny_tokenizer, tmp_path, [AnchorCallback(config, axis=tiny_axis)], bf16=True, max_steps=2)
    trainer.train()
    logs = _anchor_logs(trainer)
    assert logs and all(torch.isfinite(torch.tensor(v)) for h in logs for k, v in h.items() if k != "step")
    assert logs[-1]["anchor/penalty"] > 0  # the penalty was read (and, for match, the reference ran) under autocast
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_replay_asks_the_given_questions(tiny_tokenizer):
    from anchor.methods import default_prompts, replay_questions
    from anchor.personas import load_default_prompts

    config = AnchorConfig(method="replay", replay_questions=["What is two plus two?"])
    prompts = default_prompts(tiny_tokenizer, replay_questions(config), 3, "salt", load_default_prompts())
    assert len(prompts) == 3
    assert all("What is two plus two?" in tiny_tokenizer.decode(p) for p in prompts)


def test_lm_replay_pool_asks_plain_questions(tiny_tokenizer, tiny_axis, tmp_path):
    config = AnchorConfig(layers=LAYERS, method=["preventative", "lm_replay"], lm_replay_pool=6,
                          replay_max_new_tokens=3, replay_questions=["Name a colour.", "Count to three."])
    callback = AnchorCallback(config, axis=tiny_axis)
    _sft(tiny_tokenizer, tmp_path, [callback], max_steps=1).train()
    plain = {tuple(encode_prompt(tiny_tokenizer, [{"role": "user", "content": q}])) for q in config.replay_questions}
    pool = callback.anchor.method("lm_replay").pool
    for ids, attention, answer in zip(pool["input_ids"], pool["attention_mask"], pool["answer_mask"], strict=True):
        prompt = ids[attention.bool() & ~answer].tolist()
        assert tuple(prompt) in plain  # the question alone: no system message
        assert answer.any()
