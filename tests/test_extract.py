"""The batched extraction path (shared prompt heads, batches across personas, units of work) computes what the
straightforward one did: each persona alone, every prompt run in full through ``model.generate``. That path is
kept here, and only here, as the reference the fast one is held to (1e-5)."""

from __future__ import annotations

import pytest
import torch

import anchor.extract as ex
from anchor.extract import ExtractionSettings, Persona, extract, left_pad, load_shard, run_batch, stop_ids
from anchor.hooks import LayerHooks
from anchor.spans import encode_prompt
from tests.conftest import TINY_QUESTIONS, make_tiny_model

PERSONAS = [
    Persona("default", ("", "You are a helpful assistant.")),
    Persona("pirate", ("You are a pirate captain.", "Speak as a salty old pirate.")),
    Persona("ghost", ("You are a ghost haunting a house.",)),
    Persona("poet", ("You are a poet who answers in verse.",)),
    Persona("robot", ("You are a clanking robot.",)),
]


@torch.no_grad()
def reference_run_batch(model, tokenizer, prompts, settings, prompt_end=1):
    """The previous extraction of one batch: left-padded full prompts through ``generate``, every decode step's
    last position kept, then masked means over the answer tokens fed before the first stop token."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, torch.device("cpu"))
    steps: dict[int, list[torch.Tensor]] = {}
    keep = prompt_end if settings.mode == "prompt" else 1
    with LayerHooks(model, range(4), lambda i, h: steps.setdefault(i, []).append(h[:, -keep:].float())):
        if settings.mode == "prompt":
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            stacked = torch.stack([steps[i][0] for i in range(4)], dim=1)
            return stacked.mean(dim=2), torch.full((len(prompts),), keep), stacked.norm(dim=-1).mean(dim=2), None
        stop = sorted(stop_ids(model, tokenizer))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
    generated = out[:, ids.shape[1]:]
    fed = generated[:, : len(steps[0]) - 1]
    valid = (~(torch.isin(fed, torch.tensor(stop)).long().cumsum(dim=1) > 0)).float()
    counts = valid.sum(dim=1).long()
    hidden = torch.stack([torch.cat(steps[i][1:], dim=1) for i in range(4)], dim=2)  # [B, T, L, H]
    means = (hidden * valid[..., None, None]).sum(dim=1) / counts.clamp(min=1)[:, None, None]
    norms = (hidden.norm(dim=-1) * valid[..., None]).sum(dim=1) / counts.clamp(min=1)[:, None]
    texts = []
    for row in generated.tolist():
        ends = [i for i, t in enumerate(row) if t in stop]
        texts.append(tokenizer.decode(row[: ends[0]] if ends else row, skip_special_tokens=True))
    return means, counts, norms, texts


def _prompts(tokenizer, persona):
    return [encode_prompt(tokenizer, ex._messages(s, q)) for s in persona.system_prompts for q in TINY_QUESTIONS]


@pytest.fixture
def stopping_model(tiny_tokenizer):
    """The tiny model with one of its common answer tokens made a stop token, so some answers end early."""
    model = make_tiny_model(tiny_tokenizer)
    prompts = [p for persona in PERSONAS for p in _prompts(tiny_tokenizer, persona)]
    out = model.generate(input_ids=left_pad(prompts, tiny_tokenizer.pad_token_id, torch.device("cpu"))[0],
                         max_new_tokens=6, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    later = out[:, -4:].flatten()  # a token seen in mid-answer positions: some rows stop after a few tokens
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, int(later.mode().values)]
    return model


@pytest.mark.parametrize("mode", ["generate", "prompt"])
def test_batched_extraction_equals_the_per_persona_generate_path(stopping_model, tiny_tokenizer, tmp_path, mode):
    settings = ExtractionSettings(mode=mode, max_new_tokens=6, batch_size=5)
    paths = extract(stopping_model, tiny_tokenizer, PERSONAS, TINY_QUESTIONS, tmp_path, settings, progress=False)
    prompt_end = ex._generation_prompt_length(tiny_tokenizer) if mode == "prompt" else 1
    early = 0
    for persona, path in zip(PERSONAS, paths, strict=True):
        shard = load_shard(path)
        means, counts, norms, texts = reference_run_batch(stopping_model, tiny_tokenizer,
                                                          _prompts(tiny_tokenizer, persona), settings, prompt_end)
        assert shard.items == [(p, q) for p in range(len(persona.system_prompts)) for q in range(len(TINY_QUESTIONS))]
        assert shard.counts.tolist() == counts.tolist()
        torch.testing.assert_close(shard.means, means, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shard.norms, norms, rtol=1e-5, atol=1e-5)
        if mode == "generate":
            assert shard.texts == texts
            early += int((counts < settings.max_new_tokens - 1).sum())
    assert mode == "prompt" or early > 0, "no answer stopped early: the stop handling went untested"


def test_shared_heads_change_nothing(tiny_model, tiny_tokenizer):
    """Rows that share a system message reuse its KV cache, with their true positions. A head longer than allowed
    (here: the whole prompt) is capped, so the recorded tokens are always computed in the rows' own pass."""
    groups = [[encode_prompt(tiny_tokenizer, ex._messages(s, q)) for q in TINY_QUESTIONS]
              for s in ("You are a pirate captain.", "You are a ghost.", "")]
    prompts = [p for group in groups for p in group]
    by_group = [ex._shared_head(group) for group in groups for _ in group]
    assert len({tuple(p[:n]) for p, n in zip(prompts, by_group, strict=True)}) == 3 and min(by_group) > 0
    for settings, end in ((ExtractionSettings(max_new_tokens=5), 1), (ExtractionSettings(mode="prompt"), 3)):
        plain = run_batch(tiny_model, tiny_tokenizer, prompts, settings, end)
        for shared in (by_group, [len(p) for p in prompts]):
            fast = run_batch(tiny_model, tiny_tokenizer, prompts, settings, end, shared=shared)
            assert plain[1].tolist() == fast[1].tolist() and plain[3] == fast[3]
            torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast[2], plain[2], rtol=1e-5, atol=1e-5)


def test_shared_head_is_the_common_prefix():
    assert ex._shared_head([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert ex._shared_head([[1, 2, 3]]) == 3
    assert ex._shared_head([[7, 2], [1, 2]]) == 0


def test_units_of_work_are_consecutive_full_batches():
    sizes = [8, 8, 4, 4, 4, 2]
    units = ex.units_of_work(sizes, 8)
    assert units == [[0], [1], [2, 3, 4, 5]]  # [4, 5] alone would be short of a batch
    assert [i for u in units for i in u] == list(range(len(sizes)))
    assert ex.units_of_work(sizes, 100) == [list(range(6))]
    assert ex.units_of_work([3, 3, 3], 4) == [[0, 1, 2]]  # a short tail joins the unit before it


def test_sampling_is_seeded_and_repeats(tiny_model, tiny_tokenizer, tmp_path):
    def run(seed, name):
        settings = ExtractionSettings(max_new_tokens=6, temperature=1.0, batch_size=4, seed=seed)
        paths = extract(tiny_model, tiny_tokenizer, PERSONAS[:2], TINY_QUESTIONS, tmp_path / name, settings,
                        progress=False)
        return [load_shard(p) for p in paths]

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert all(x.texts == y.texts and torch.equal(x.means, y.means) for x, y in zip(a, b, strict=True))
    assert any(x.texts != z.texts for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("temperature", [-1.0, float("nan"), float("inf")])
def test_bad_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        ExtractionSettings(temperature=temperature)
