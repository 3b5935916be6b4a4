"""The llama.cpp control-vector export: file layout read back with the gguf package, and its meaning."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from anchor import AssistantAxis, cli, steer
from anchor.axis import MissingStatisticError
from anchor.export import control_vector, export_control_vector
from anchor.hooks import LayerHooks
from anchor.spans import encode_prompt


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def test_file_layout_and_values(tiny_axis, tmp_path):
    path = export_control_vector(tiny_axis, tmp_path / "assistant.gguf", coeff=0.5, layers=[3, 1])
    fields, tensors = _read(path)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama"
    assert fields["controlvector.layer_count"] == 2
    assert fields["anchor.fingerprint"] == tiny_axis.metadata["fingerprint"]
    assert fields["anchor.coeff"] == pytest.approx(0.5)
    assert sorted(tensors) == ["direction.1", "direction.3"]
    for layer in (1, 3):
        t = tensors[f"direction.{layer}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [tiny_axis.hidden_size]
        expected = 0.5 * tiny_axis.residual_norm[layer] * tiny_axis.unit[layer]
        np.testing.assert_allclose(np.asarray(t.data), expected.numpy(), rtol=1e-6, atol=0)
        # toward the Assistant by exactly coeff mean residual norms
        assert float(torch.from_numpy(np.asarray(t.data).copy()) @ tiny_axis.unit[layer]) == pytest.approx(
            0.5 * float(tiny_axis.residual_norm[layer]), rel=1e-5)


def test_default_layer_is_the_report_layer(tiny_axis):
    assert list(control_vector(tiny_axis, 0.25)) == [tiny_axis.report_layer]


def test_adding_direction_n_to_layer_n_output_is_anchor_steer(tiny_axis, tiny_model, tiny_tokenizer, tmp_path):
    """llama.cpp adds direction.N to the output of decoder layer N (build_cvec(cur, il) before l_out): doing that
    here with the vectors read back from the file gives exactly what anchor.steer does."""
    ids = torch.tensor([encode_prompt(tiny_tokenizer, [{"role": "user", "content": "Who are you?"}])])
    path = export_control_vector(tiny_axis, tmp_path / "cv.gguf", coeff=-0.75, layers=[1, 2])
    _, tensors = _read(path)
    read_back = {int(name.split(".")[1]): torch.from_numpy(np.asarray(t.data).copy()) for name, t in tensors.items()}
    with torch.no_grad():
        plain = tiny_model(ids).logits
        with LayerHooks(tiny_model, read_back, lambda i, h: h + read_back[i]):
            llama_cpp_style = tiny_model(ids).logits
        with steer(tiny_model, tiny_axis, -0.75, layers=[1, 2]):
            ours = tiny_model(ids).logits
    assert not torch.allclose(plain, ours)
    assert torch.equal(llama_cpp_style, ours)


def test_refusals(tiny_axis, tmp_path):
    with pytest.raises(ValueError, match="layer 0"):
        control_vector(tiny_axis, 0.5, layers=[0, 1])
    with pytest.raises(ValueError, match="out of range"):
        control_vector(tiny_axis, 0.5, layers=[tiny_axis.n_layers])
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="coeff="):
            control_vector(tiny_axis, bad)
    target = tmp_path / "cv.gguf"
    target.write_bytes(b"a result of the user's")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_control_vector(tiny_axis, target, 0.5)
    assert target.read_bytes() == b"a result of the user's"
    export_control_vector(tiny_axis, target, 0.5, overwrite=True)
    assert _read(target)[0]["general.architecture"] == "controlvector"
    imported = AssistantAxis(axis=tiny_axis.axis.clone(), metadata={"imported_from": {}})
    with pytest.raises(MissingStatisticError, match="mean residual norms"):
        export_control_vector(imported, tmp_path / "imported.gguf", 0.5)
    assert not (tmp_path / "imported.gguf").exists()


def test_cli(tiny_axis, tmp_path, capsys):
    tiny_axis.save_pretrained(tmp_path / "axis")
    out = tmp_path / "assistant.gguf"
    args = ["export", "--format", "gguf-control-vector", "--axis", str(tmp_path / "axis"), "--out", str(out),
            "--coeff", "0.3", "--layers", "2", "3"]
    assert cli.main(args) == 0
    assert "--control-vector" in capsys.readouterr().out
    fields, tensors = _read(out)
    assert sorted(tensors) == ["direction.2", "direction.3"] and fields["anchor.coeff"] == pytest.approx(0.3)
    assert cli.main([*args[:-3], "--layers", "0", "--overwrite"]) == 1
    assert "layer 0" in capsys.readouterr().err
    assert sorted(_read(out)[1]) == ["direction.2", "direction.3"]  # the refused export left the file alone
