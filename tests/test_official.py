"""Importing the paper's published axis and capping setting: format, sign conversion, refusals, round trip."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anchor import AssistantAxis, cap, cli, steer
from anchor.axis import MissingStatisticError
from anchor.hooks import LayerHooks
from anchor.official import OfficialFormatError, parse_experiment
from anchor.spans import encode_prompt

N_LAYERS, HIDDEN = 4, 32  # the tiny model of conftest.make_tiny_model
EXPERIMENT = "layers_2:4-p0.25"


class NotATensor:
    """A custom class: torch.load(weights_only=True) must refuse to unpickle it."""


def _axis(seed: int = 0) -> torch.Tensor:
    return torch.randn(N_LAYERS, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _vectors(axis: torch.Tensor, sign: float, layers=(2, 3), noise: float = 0.3) -> dict:
    """Capping vectors in the release's layout: sign=-1 points away from the Assistant (the published case)."""
    gen = torch.Generator().manual_seed(1)
    scale = noise * axis.norm(dim=-1) / HIDDEN ** 0.5
    return {f"layer_{i}/contrast": {"vector": sign * (axis[i] + scale[i] * torch.randn(HIDDEN, generator=gen)),
                                    "layer": i} for i in layers}


def _capping(vectors: dict, caps: dict[int, float], experiment: str = EXPERIMENT) -> dict:
    names = {v["layer"]: k for k, v in vectors.items()}
    return {"vectors": vectors, "experiments": [
        {"id": "layers_0:1-p0.5", "interventions": [{"vector": names[min(names)], "cap": 0.0}]},
        {"id": experiment, "interventions": [{"vector": names[i], "cap": c} for i, c in caps.items()]},
    ]}


def _write(tmp_path, axis_obj, capping_obj=None):
    axis_file = tmp_path / "assistant_axis.pt"
    torch.save(axis_obj, axis_file)
    if capping_obj is None:
        return axis_file, None
    capping_file = tmp_path / "capping_config.pt"
    torch.save(capping_obj, capping_file)
    return axis_file, capping_file


def _official_cap(vectors: dict, caps: dict[int, float]):
    """The release's operation, written from its definition: h ← h − v̂·max(0, v̂·h − τ)."""
    units = {v["layer"]: v["vector"] / v["vector"].norm() for v in vectors.values()}

    def fn(layer, hidden):
        unit = units[layer]
        return hidden - unit * (hidden @ unit - caps[layer]).clamp(min=0).unsqueeze(-1)

    return fn


def _layer_outputs(model, ids, layers):
    outs = {}
    with LayerHooks(model, layers, lambda i, h: outs.__setitem__(i, h.detach().clone())), torch.no_grad():
        logits = model(ids).logits
    return outs, logits


@pytest.mark.parametrize("wrap", ["bare", "dict"])
def test_axis_file_bare_or_dict_with_metadata(tmp_path, wrap):
    axis = _axis()
    obj = axis if wrap == "bare" else {"axis": axis, "model_name": "tiny", "n_roles": 275, "notes": torch.ones(2)}
    axis_file, _ = _write(tmp_path, obj)
    imported = AssistantAxis.from_official(axis_file)
    assert torch.equal(imported.axis, axis) and imported.imported
    assert torch.allclose(imported.unit.norm(dim=-1), torch.ones(N_LAYERS))
    source = imported.metadata["imported_from"]
    assert source["axis_sha256"] == hashlib.sha256(axis_file.read_bytes()).hexdigest()
    assert source["axis_file_metadata"] == ({} if wrap == "bare" else {"model_name": "tiny", "n_roles": 275})
    assert "arXiv 2601.10387" in source["paper"] and "cap" not in imported.metadata
    assert imported.n_layers == N_LAYERS and imported.report_layer == N_LAYERS // 2


def test_cap_is_converted_to_a_floor_on_the_flipped_vector(tmp_path):
    axis = _axis()
    vectors = _vectors(axis, sign=-1.0)
    caps = {2: -1.5, 3: 0.25}
    imported = AssistantAxis.from_official(*_write(tmp_path, axis, _capping(vectors, caps)), experiment=EXPERIMENT)
    setting = imported.metadata["cap"]
    assert setting["layers"] == [2, 3] and setting["percentile"] == 25.0
    assert setting["tau"] == {"2": 1.5, "3": -0.25} and setting["published_tau"] == {"2": -1.5, "3": 0.25}
    for i in (2, 3):
        v = vectors[f"layer_{i}/contrast"]["vector"]
        torch.testing.assert_close(imported.unit[i], -v / v.norm())  # û = −v̂
        torch.testing.assert_close(imported.axis[i].norm(), axis[i].norm())  # the published scale is kept
        assert imported.metadata["imported_from"]["capping_cosines"][str(i)] < -0.5
        with pytest.raises(MissingStatisticError):  # no quantiles: cap() reads the stored floors instead
            imported.tau(i, 25.0)
    assert torch.equal(imported.axis[:2], axis[:2])  # uncapped layers keep the published axis


def test_round_trip_caps_exactly_like_the_official_code(tmp_path, tiny_model, tiny_tokenizer):
    """import → save_pretrained → from_pretrained → cap(model, axis) equals the release's cap-from-above."""
    ids = torch.tensor([encode_prompt(tiny_tokenizer, [{"role": "user", "content": "Who are you, really?"}])])
    axis = _axis()
    vectors = _vectors(axis, sign=-1.0)
    plain, plain_logits = _layer_outputs(tiny_model, ids, [2])
    v2 = vectors["layer_2/contrast"]["vector"]
    caps = {2: float((plain[2][0] @ (v2 / v2.norm())).median()), 3: 0.0}  # half the tokens above the cap
    files = _write(tmp_path, {"axis": axis}, _capping(vectors, caps))
    AssistantAxis.from_official(*files, experiment=EXPERIMENT, model=tiny_model).save_pretrained(tmp_path / "bundle")
    loaded = AssistantAxis.from_pretrained(tmp_path / "bundle")
    assert loaded.imported and loaded.metadata["cap"]["tau"] == {"2": -caps[2], "3": -caps[3]}
    with LayerHooks(tiny_model, [2, 3], _official_cap(vectors, caps)):
        official, official_logits = _layer_outputs(tiny_model, ids, [2, 3])
    with cap(tiny_model, loaded) as handle:
        ours, ours_logits = _layer_outputs(tiny_model, ids, [2, 3])
    assert handle.layers == [2, 3] and handle.tau == {2: -caps[2], 3: -caps[3]}
    assert not torch.allclose(ours_logits, plain_logits)  # the cap did something
    torch.testing.assert_close(ours_logits, official_logits, rtol=1e-5, atol=1e-5)
    for i in (2, 3):
        torch.testing.assert_close(ours[i], official[i], rtol=1e-5, atol=1e-5)
        assert (loaded.project(ours[i], i) >= handle.tau[i] - 1e-4).all()  # floored at τ' = −τ
    lifted = (plain[2][0] @ loaded.unit[2]) < handle.tau[2]
    assert lifted.any() and (~lifted).any()
    torch.testing.assert_close(loaded.project(ours[2][0][lifted], 2), torch.full((int(lifted.sum()),), -caps[2]))


def test_capping_vector_toward_the_assistant_is_refused(tmp_path):
    axis = _axis()
    files = _write(tmp_path, axis, _capping(_vectors(axis, sign=+1.0), {2: 1.0, 3: 1.0}))
    with pytest.raises(OfficialFormatError, match=r"points toward the Assistant.*ceiling"):
        AssistantAxis.from_official(*files, experiment=EXPERIMENT)


def test_undecidable_sign_is_refused(tmp_path):
    axis = _axis()
    orthogonal = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(5))
    orthogonal -= (orthogonal @ axis[2]) / axis[2].norm() ** 2 * axis[2]
    vectors = {"a": {"vector": orthogonal, "layer": 2}}
    files = _write(tmp_path, axis, {"vectors": vectors, "experiments": [
        {"id": "layers_2:3-p0.25", "interventions": [{"vector": "a", "cap": 1.0}]}]})
    with pytest.raises(OfficialFormatError, match="cannot be decided"):
        AssistantAxis.from_official(*files)


def _good_capping(axis):
    return _capping(_vectors(axis, -1.0), {2: 1.0, 3: 1.0})


MALFORMED_CAPPING = {
    "no experiments": lambda c: c.pop("experiments"),
    "unknown vector": lambda c: c["experiments"][1]["interventions"][0].update(vector="nope"),
    "wrong width": lambda c: c["vectors"]["layer_2/contrast"].update(vector=torch.ones(HIDDEN + 1)),
    "layer out of range": lambda c: c["vectors"]["layer_2/contrast"].update(layer=N_LAYERS),
    "non-finite cap": lambda c: c["experiments"][1]["interventions"][0].update(cap=float("nan")),
    "layer capped twice": lambda c: c["experiments"][1]["interventions"].append(
        c["experiments"][1]["interventions"][0]),
    "id names other layers": lambda c: c["experiments"][1].update(id="layers_1:3-p0.25"),
    "id without percentile": lambda c: c["experiments"][1].update(id="layers_2:4"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_CAPPING))
def test_malformed_capping_file_is_refused(tmp_path, case):
    axis = _axis()
    capping = _good_capping(axis)
    MALFORMED_CAPPING[case](capping)
    experiment = "layers_2:4" if case == "id without percentile" else None
    experiment = "layers_1:3-p0.25" if case == "id names other layers" else experiment or EXPERIMENT
    with pytest.raises(OfficialFormatError):
        AssistantAxis.from_official(*_write(tmp_path, axis, capping), experiment=experiment)


@pytest.mark.parametrize("obj", [{"direction": torch.ones(4, 8)}, torch.ones(2, 3, 4), torch.zeros(4, 8),
                                 torch.full((4, 8), float("inf")), NotATensor(), [1, 2]], ids=str)
def test_malformed_axis_file_is_refused(tmp_path, obj):
    with pytest.raises(OfficialFormatError):
        AssistantAxis.from_official(_write(tmp_path, obj)[0])


def test_experiment_choice(tmp_path):
    axis = _axis()
    files = _write(tmp_path, axis, _good_capping(axis))
    with pytest.raises(OfficialFormatError, match="choose one with experiment="):
        AssistantAxis.from_official(*files)  # two experiments, neither recommended
    with pytest.raises(OfficialFormatError, match="no single experiment"):
        AssistantAxis.from_official(*files, experiment="layers_9:10-p0.25")
    with pytest.raises(ValueError, match="pass capping_file"):
        AssistantAxis.from_official(files[0], experiment=EXPERIMENT)
    assert parse_experiment("layers_46:54-p0.25") == (range(46, 54), 25.0)
    assert parse_experiment("layers_56:72-p0.1") == (range(56, 72), 10.0)
    assert parse_experiment("custom-p0.5") == (None, 50.0)


def test_shapes_are_checked_against_the_model(tmp_path, tiny_model, tiny_tokenizer):
    axis_file, _ = _write(tmp_path, torch.randn(N_LAYERS + 1, HIDDEN))
    with pytest.raises(OfficialFormatError, match="released for another model"):
        AssistantAxis.from_official(axis_file, model=tiny_model)
    tiny_model.save_pretrained(tmp_path / "model")
    with pytest.raises(OfficialFormatError, match=r"5, 32.*4 decoder layers of width 32"):
        AssistantAxis.from_official(axis_file, model=tmp_path / "model")  # config only, no weights
    good, _ = _write(tmp_path, _axis())
    imported = AssistantAxis.from_official(good, model=tiny_model)
    assert imported.metadata["model_type"] == "llama" and imported.metadata["fingerprint"]
    imported.check_compatible(tiny_model)


def test_imported_bundle_says_what_it_lacks(tmp_path, tiny_model):
    imported = AssistantAxis.from_official(_write(tmp_path, _axis())[0])
    imported.save_pretrained(tmp_path / "bundle")
    loaded = AssistantAxis.from_pretrained(tmp_path / "bundle")
    calls = {
        "projection quantiles": lambda a: a.tau(2, 25.0),
        "role vectors": lambda a: a.role_projections(2),
        "default mean": lambda a: a.default_projection(2),
        "persona-space PCA": lambda a: a.pc1_cosine(),
        "mean residual norms": lambda a: steer(tiny_model, a, 0.5).__enter__(),
    }
    for what, call in calls.items():
        for bundle in (imported, loaded):
            with pytest.raises(MissingStatisticError, match=rf"no {what}.*anchor axis --model"):
                call(bundle)
    with pytest.raises(MissingStatisticError, match="tau="):
        cap(tiny_model, loaded).__enter__()  # no published setting: the default percentile has no quantiles
    with cap(tiny_model, loaded, tau=0.0) as handle:  # explicit floors need nothing else
        assert handle.layers == [2, 3]


def test_cli_writes_a_bundle_and_refuses_to_overwrite(tmp_path, capsys):
    axis = _axis()
    axis_file, capping_file = _write(tmp_path, axis, _good_capping(axis))
    args = ["import-axis", "--axis-file", str(axis_file), "--capping-file", str(capping_file),
            "--experiment", EXPERIMENT, "--out", str(tmp_path / "bundle")]
    assert cli.main(args) == 0
    assert "layers 2-3" in capsys.readouterr().out
    config = json.loads((tmp_path / "bundle" / "axis_config.json").read_text())
    assert config["metadata"]["cap"]["tau"] == {"2": -1.0, "3": -1.0}
    assert config["metadata"]["imported_from"]["experiment"] == EXPERIMENT
    assert cli.main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite"]) == 0


@pytest.mark.slow
def test_docs_example_runs_as_written(tmp_path):
    """The python block of docs/import-export.md's import section, in a fresh process (it loads the embedded
    model)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "import-export.md").read_text()
    section = text.split("## The paper's published axes", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    first, second = out.stdout.strip().splitlines()[-2:]
    assert first == "[21, 22, 23, 24, 25] 1.0" and second == "[21, 22, 23, 24, 25] 1.0"
    assert AssistantAxis.from_pretrained(tmp_path / "outputs" / "imported-axis").imported
