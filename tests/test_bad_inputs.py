"""The bad inputs users make, and what each gets: a clear refusal that names the fix, given before any long work,
with nothing lost. Each test reproduces one defect found by feeding the package bad input (issue 11); the table in
docs/bad-inputs.md lists them with these test names.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import anchor.tracking as tracking
from anchor.axis import CONFIG_NAME, WEIGHTS_NAME, AssistantAxis
from anchor.capping import attach_cap
from anchor.chat import chat_loop, generate_replies
from anchor.cli import main
from anchor.data import PersonaData
from anchor.hooks import check_layers
from anchor.io import atomic_write, atomic_write_json, check_output_dir, check_output_file, nan_to_none, read_utf8
from anchor.monitor import ContextLengthError, monitor
from tests.conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
QA = [{"role": "user", "content": "Is Paris the capital of France?"},
      {"role": "assistant", "content": "Yes, it is."}]


@pytest.fixture
def saved(tmp_path, tiny_model, tiny_tokenizer, tiny_axis):
    """A saved tiny model and axis bundle, a one-turn conversation file, and the CLI options that name them."""
    model_dir, axis_dir, conv = tmp_path / "model", tmp_path / "axis", tmp_path / "conv.json"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    tiny_axis.save_pretrained(axis_dir)
    conv.write_text(json.dumps(QA))
    return {"model": model_dir, "axis": axis_dir, "conv": conv,
            "args": ["--model", str(model_dir), "--axis", str(axis_dir), "--device", "cpu", "--quiet"]}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: the refusal under test must come before that work."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("anchor.models.load_model", refuse)


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI, assert it refused with one line on stderr and no traceback, return that line."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"anchor {argv[0]}: error: ") and "Traceback" not in err
    return err


# ----------------------------------------------------------------------------------------------------------------
# 1. The README's two commands in sequence: what a run leaves behind must not change the lint
# ----------------------------------------------------------------------------------------------------------------


def _ruff() -> str:
    found = shutil.which("ruff", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip("ruff is not installed")
    return found


def test_a_wandb_folder_at_the_root_does_not_change_import_sorting(tmp_path):
    project = tmp_path / "clone"
    (project / "tests").mkdir(parents=True)
    (project / "wandb" / "latest-run").mkdir(parents=True)  # what an offline wandb run leaves in the cwd
    (project / "tests" / "test_x.py").write_text("import pytest\nimport wandb\n\nfrom anchor import cap\n\n"
                                                 "print(pytest, wandb, cap)\n")
    pyproject = (ROOT / "pyproject.toml").read_text()
    (project / "pyproject.toml").write_text(pyproject)
    cmd = [_ruff(), "check", "--no-cache", "--select", "I", str(project / "tests")]
    done = subprocess.run(cmd, cwd=project, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    # The same clone without the isort section is the defect: wandb/ makes wandb first-party.
    (project / "pyproject.toml").write_text(pyproject.split("[tool.ruff.lint.isort]")[0])
    assert subprocess.run(cmd, cwd=project, capture_output=True, text=True).returncode == 1


def test_quickstart_writes_wandb_under_outputs(tmp_path):
    """scripts/quickstart.sh, with a stand-in `anchor` that reports the environment it was given."""
    (tmp_path / "anchor").write_text("#!/usr/bin/env bash\necho \"WANDB_DIR=$WANDB_DIR WANDB_MODE=$WANDB_MODE\"\n")
    (tmp_path / "anchor").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PATH=f"{tmp_path}{os.pathsep}{env['PATH']}", QUICKSTART_SETUP="0", OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "WANDB_DIR=outputs WANDB_MODE=offline" in done.stdout and "under outputs/wandb" in done.stdout


def test_ci_runs_the_readme_sequence_and_its_overrides_are_recipe_fields():
    script = (ROOT / ".ci" / "run").read_text()
    assert script.index("bash scripts/quickstart.sh") < script.index("bash scripts/test.sh")
    call = script[script.index("bash scripts/quickstart.sh"):].split("\n#")[0]
    overrides = call.replace("\\\n", " ").split()[2:]
    from anchor.train import parse_args

    script_args, training_args, _, anchor_config = parse_args(["--config", str(ROOT / "recipes/quickstart.yaml"),
                                                               *overrides])
    assert training_args.max_steps == 2 and training_args.output_dir == "outputs/ci/quickstart"
    assert script_args.dataset == "outputs/ci/data" and anchor_config.axis_n_roles == 4


# ----------------------------------------------------------------------------------------------------------------
# 2 and 6. wandb: offline without a login, files under the run, one run across a kill and a resume
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def clean_wandb_env(monkeypatch, tmp_path):
    """No wandb variables, no login, and a fresh record of what anchor.tracking set."""
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login x password y\n")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setattr(tracking, "_ours", {})
    return netrc


def test_wandb_goes_offline_without_a_login_and_writes_under_the_run(clean_wandb_env, tmp_path):
    out = tmp_path / "run"
    line = tracking.configure_wandb(out, ["wandb"])
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(out)
    run_id = (out / tracking.RUN_ID_FILE).read_text().strip()
    assert os.environ["WANDB_RUN_ID"] == run_id and "WANDB_RESUME" not in os.environ
    assert line.count("\n") == 0 and line.startswith("wandb: no login found, so new run ") and "offline" in line
    assert f"wandb sync {out}/wandb/offline-run-*-{run_id}" in line


def test_wandb_login_or_a_users_mode_is_respected(clean_wandb_env, tmp_path, monkeypatch):
    clean_wandb_env.write_text("machine api.wandb.ai login user password secret\n")
    assert "offline" not in tracking.configure_wandb(tmp_path / "a", "wandb") and "WANDB_MODE" not in os.environ
    clean_wandb_env.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "k")
    tracking.configure_wandb(tmp_path / "b", "all")
    assert "WANDB_MODE" not in os.environ
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    line = tracking.configure_wandb(tmp_path / "c", ["tensorboard", "wandb"])
    assert os.environ["WANDB_MODE"] == "disabled" and os.environ["WANDB_DIR"] == str(tmp_path / "mine")
    assert "mode disabled" in line
    assert tracking.configure_wandb(tmp_path / "d", "none") is None and tracking.configure_wandb(tmp_path, None) is None
    monkeypatch.setenv("RANK", "1")  # another process of a distributed run: it neither logs nor writes the id
    assert tracking.configure_wandb(tmp_path / "e", "wandb") is None and not (tmp_path / "e").exists()


_TWO_RUNS = textwrap.dedent("""
    import sys
    from pathlib import Path
    import wandb
    from anchor.tracking import configure_wandb

    for name in ("twin", "run"):  # what --compare does: two trainings, one process
        configure_wandb(Path(sys.argv[1]) / name, ["wandb"])
        run = wandb.init(project="anchor-test")
        print(name, run.id, run.dir)
        run.finish()
""")


def test_two_runs_in_one_process_get_their_own_ids_and_dirs(clean_wandb_env, tmp_path):
    """--compare trains twice in one process: the second run must not reuse the first's wandb id or directory."""
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "NETRC": str(clean_wandb_env), "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _TWO_RUNS, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("twin ", "run ")))
    for name, (run_id, run_dir) in {k: v.split() for k, v in runs.items()}.items():
        assert (tmp_path / name / tracking.RUN_ID_FILE).read_text().strip() == run_id
        assert Path(run_dir).is_relative_to(tmp_path / name / "wandb")
    assert runs["twin"].split()[0] != runs["run"].split()[0]


_PART = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import wandb
    from anchor.tracking import FLUSH_INTERVAL_S, configure_wandb

    out, start, kill = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "kill"
    print(configure_wandb(out, ["wandb"], resume=start > 0), flush=True)
    run = wandb.init(project="anchor-test")
    for step in range(start, start + 3):
        run.log({"loss": 1.0 / (step + 1)}, step=step)
    if kill:  # a SIGKILL lands after wandb's flush interval, as a kill during a long training run would
        record = next((out / "wandb").glob(f"offline-run-*-{run.id}/run-{run.id}.wandb"))
        deadline = time.monotonic() + 5 * FLUSH_INTERVAL_S
        while record.stat().st_size < 1000 and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    run.finish()
""")


def test_a_killed_wandb_run_keeps_its_data_and_the_resumed_run_continues_it(clean_wandb_env, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    script = tmp_path / "part.py"
    script.write_text(_PART)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "NETRC": str(clean_wandb_env), "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, str(script), str(out), "0", "kill"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, str(script), str(out), "3", "finish"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run_id = (out / tracking.RUN_ID_FILE).read_text().strip()
    assert f"continuing run {run_id}" in resumed.stdout and f"new run {run_id}" in killed.stdout
    parts = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(parts) == 2  # one wandb run id, two parts: `wandb sync` uploads them in order as one run
    sizes = [(p / f"run-{run_id}.wandb").stat().st_size for p in parts]
    assert min(sizes) > 1000, sizes  # the killed part kept its data, not just the file header


# ----------------------------------------------------------------------------------------------------------------
# 3 and 4. Output paths checked before the work, results written atomically, nothing overwritten silently
# ----------------------------------------------------------------------------------------------------------------


def test_eval_drift_refuses_an_existing_file_or_report_before_loading(saved, tmp_path, capsys, no_model_load):
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    err = _refused(["eval", "drift", *saved["args"], "--out", str(a_file)], capsys)
    assert "is a file" in err and "names a directory" in err and a_file.read_text() == "mine"
    report = tmp_path / "report"
    report.mkdir()
    (report / "drift.json").write_text("{}")
    err = _refused(["eval", "drift", *saved["args"], "--out", str(report)], capsys)
    assert "already holds drift.json" in err and "--overwrite" in err


@pytest.mark.parametrize("command", ["generate", "monitor", "monitor --plot"])
def test_generate_and_monitor_refuse_a_directory_as_out_before_loading(command, saved, tmp_path, capsys,
                                                                       no_model_load):
    name, *flag = command.split()
    flag = flag[0] if flag else "--out"
    head = ["generate", "--in", str(saved["conv"])] if name == "generate" else ["monitor", str(saved["conv"])]
    err = _refused([*head, *saved["args"], flag, str(tmp_path)], capsys)
    assert f"{flag} {tmp_path} is a directory" in err and "names a file" in err


def test_generate_keeps_an_existing_result_unless_told_to_overwrite(saved, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "replies.jsonl"
    src.write_text(json.dumps(QA[:1]) + "\n")
    out.write_text("earlier replies\n")
    err = _refused(["generate", "--in", str(src), "--out", str(out), *saved["args"]], capsys)
    assert "already exists" in err and "--overwrite" in err and out.read_text() == "earlier replies\n"
    assert main(["generate", "--in", str(src), "--out", str(out), *saved["args"], "--max-new-tokens", "3",
                 "--overwrite"]) == 0
    assert json.loads(out.read_text())["messages"] == QA[:1]


def test_an_interrupted_write_leaves_the_old_file_and_no_debris(tmp_path):
    path = tmp_path / "drift.json"
    atomic_write_json(path, {"old": 1})

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text('{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"old": 1} and [p.name for p in tmp_path.iterdir()] == ["drift.json"]


def test_output_checks_name_the_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, so nothing can be written below it"):
        check_output_file(tmp_path / "file" / "out.json")
    with pytest.raises(NotADirectoryError, match=r"--out .* is a file"):
        check_output_dir(tmp_path / "file", ["a"])
    assert check_output_dir(tmp_path / "new" / "dir", ["a"]) == tmp_path / "new" / "dir"
    assert check_output_file(tmp_path / "file", overwrite=True) == tmp_path / "file"


def test_anchor_data_refuses_an_existing_dataset(saved, tmp_path, capsys, no_model_load):
    existing = tmp_path / "data"
    existing.mkdir()
    (existing / "data_config.json").write_text("{}")
    err = _refused(["data", "--model", str(saved["model"]), "--out", str(existing), "--role-names", "bard"], capsys)
    assert "already holds data_config.json" in err and "--overwrite" in err
    assert (existing / "data_config.json").read_text() == "{}"


def test_persona_data_save_refuses_then_replaces_with_overwrite(tmp_path):
    def data(tag: str) -> PersonaData:
        record = {"messages": [{"role": "user", "content": tag}, {"role": "assistant", "content": tag}]}
        return PersonaData([record], [], [], [], [], metadata={"roles": {"bard": [tag]}})

    data("old").save(tmp_path)
    with pytest.raises(FileExistsError, match=r"already holds persona data.*overwrite=True"):
        data("new").save(tmp_path)
    assert PersonaData.load(tmp_path).sft_train[0]["messages"][0]["content"] == "old"
    data("new").save(tmp_path, overwrite=True)
    assert PersonaData.load(tmp_path).sft_train[0]["messages"][0]["content"] == "new"


# ----------------------------------------------------------------------------------------------------------------
# 7 and 8. Bad values are refused, not coerced
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layers", "message"), [
    ("21", "must be a list of layer indices"),  # read as layers 2 and 1 before
    ([1.7], "layer 1.7 .float. is not a layer index"),  # read as layer 1 before
    ([True], "layer True .bool. is not a layer index"),
    (2, "must be a list of layer indices"),
    ([9], r"layers \[9\] are out of range: this model has 4 decoder layers"),
])
def test_cap_refuses_layers_that_are_not_layer_indices(tiny_model, tiny_axis, layers, message):
    with pytest.raises(ValueError, match=message):
        attach_cap(tiny_model, tiny_axis, layers=layers)
    assert check_layers([torch.tensor(2), 1], 4) == [1, 2]  # integer scalars of any kind still count


@pytest.mark.parametrize("tau", [math.nan, math.inf, -math.inf, "1.5", True, {1: math.nan}])
def test_cap_refuses_a_floor_that_is_not_a_finite_number(tiny_model, tiny_axis, tau):
    # nan capped nothing and inf turned every reply empty before
    with pytest.raises(ValueError, match=r"tau(\[1\])?=.* must be a finite number"):
        attach_cap(tiny_model, tiny_axis, layers=[1], tau=tau)


def test_axis_tau_refuses_a_negative_layer_and_a_bad_source(tiny_axis):
    with pytest.raises(ValueError, match=r"layers \[-1\] are out of range"):
        tiny_axis.tau(-1, 25)  # was the last layer
    with pytest.raises(ValueError, match="percentile=nan"):
        tiny_axis.tau(1, math.nan)
    with pytest.raises(ValueError, match="source='role' must be 'default' or 'roles'"):
        tiny_axis.tau(1, 25, "role")


def _edit_config(axis_dir: Path, edit) -> None:
    config = json.loads((axis_dir / CONFIG_NAME).read_text())
    edit(config)
    (axis_dir / CONFIG_NAME).write_text(json.dumps(config))


def test_a_bundle_whose_role_names_were_shortened_is_refused(saved):
    _edit_config(saved["axis"], lambda c: c.update(role_names=c["role_names"][:-1]))
    with pytest.raises(ValueError, match=r"not a consistent axis bundle: 3 role_names \(3 distinct\) for 4 role "
                                         r"vectors.*recompute it"):
        AssistantAxis.from_pretrained(saved["axis"])


def test_monitor_refuses_text_past_the_models_context(tiny_model, tiny_tokenizer, tiny_axis):
    long = [QA[0], {"role": "assistant", "content": "word " * 600}]  # the tiny model's context is 512
    with pytest.raises(ContextLengthError, match=r"conversation 0 needs \d+ tokens, past the model's context of 512"):
        monitor(tiny_model, tiny_tokenizer, tiny_axis, long)
    with pytest.raises(ContextLengthError, match="past the model's context of 512"):
        generate_replies(tiny_model, tiny_tokenizer, [[{"role": "user", "content": "word " * 600}]], 4)


def test_chat_says_when_the_conversation_outgrew_the_context_and_keeps_going(tiny_model, tiny_tokenizer, tiny_axis):
    from anchor.chat import ChatSession

    session = ChatSession(tiny_model, tiny_tokenizer, tiny_axis, max_new_tokens=3)
    out: list[str] = []
    chat_loop([session], ["word " * 600, "/reset", "Hello?"], out.append)
    assert "not answered" in out[0] and "context of 512" in out[0] and "/reset starts over" in out[0]
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # the refused turn left no trace


def test_an_empty_reply_writes_null_not_bare_nan(saved, tmp_path, capsys):
    conv, out = tmp_path / "empty.json", tmp_path / "trace.json"
    conv.write_text(json.dumps([QA[0], {"role": "assistant", "content": ""}]))
    assert main(["monitor", str(conv), *saved["args"], "--out", str(out)]) == 0

    def refuse_constant(name: str) -> None:
        raise AssertionError(f"bare {name} in the JSON")

    trace = json.loads(out.read_text(), parse_constant=refuse_constant)["conversations"][0]["uncapped"]
    assert trace["per_turn"] == [None] and trace["n_tokens"] == [0]
    assert nan_to_none({"a": [math.nan, 1.0, (math.nan,)]}) == {"a": [None, 1.0, [None]]}
    with pytest.raises(ValueError, match=r"non-finite number into .*nan_to_none"):
        atomic_write_json(tmp_path / "bad.json", {"x": math.inf})


# ----------------------------------------------------------------------------------------------------------------
# 9. One line instead of a traceback
# ----------------------------------------------------------------------------------------------------------------


def test_a_local_model_path_that_does_not_exist(saved, capsys):
    err = _refused(["monitor", str(saved["conv"]), "--model", "./outputs/no/such-model", "--axis", str(saved["axis"])],
                   capsys)
    assert "--model ./outputs/no/such-model: no such directory" in err and "hub id" in err
    err = _refused(["monitor", str(saved["conv"]), "--model", str(saved["conv"]), "--axis", str(saved["axis"])], capsys)
    assert "is a file; give the model's directory (the one with config.json) or a .gguf file" in err


def test_a_hub_id_without_network_fails_at_once_from_the_local_cache(saved, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr("anchor.commands.options.hub_reachable", lambda timeout=0: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert main(["monitor", str(saved["conv"]), "--model", "nosuchorg/nosuchmodel", "--axis", str(saved["axis"]),
                 "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "the model hub cannot be reached; looking for nosuchorg/nosuchmodel in the local hub cache only" \
        in captured.out
    assert "is not in the local hub cache" in captured.err and "hf download nosuchorg/nosuchmodel" in captured.err
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_hub_id_that_does_not_exist(saved, capsys, monkeypatch):
    def missing(*_args, **_kwargs):
        raise OSError("nosuchorg/x is not a local folder and is not a valid model identifier listed on "
                      "'https://huggingface.co/models'\nIf this is a private repository, ...")

    monkeypatch.setattr("anchor.commands.options.hub_reachable", lambda timeout=0: True)
    monkeypatch.setattr("anchor.models.load_model", missing)
    err = _refused(["monitor", str(saved["conv"]), "--model", "nosuchorg/x", "--axis", str(saved["axis"])], capsys)
    assert "neither a local directory nor a model on the hub" in err and "\n" not in err


def test_a_truncated_axis_file_is_named(saved, capsys, no_model_load):
    weights = saved["axis"] / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    err = _refused(["monitor", str(saved["conv"]), *saved["args"]], capsys)
    assert f"{weights} cannot be read" in err and "truncated or damaged" in err and "recompute it" in err


def test_an_axis_config_with_a_key_missing_is_named(saved, capsys, no_model_load):
    _edit_config(saved["axis"], lambda c: c.pop("role_names"))
    err = _refused(["monitor", str(saved["conv"]), *saved["args"]], capsys)
    assert f"{saved['axis'] / CONFIG_NAME} has no 'role_names' entry" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(saved, capsys, no_model_load):
    args = ["--model", str(saved["model"]), "--axis", str(saved["axis"])]
    err = _refused(["monitor", str(saved["conv"]), *args, "--device", "cuda"], capsys)
    assert "--device cuda: torch" in err and "sees no CUDA GPU" in err and "--device cpu" in err
    err = _refused(["monitor", str(saved["conv"]), *args, "--device", "gpu0"], capsys)
    assert "is not a device name; use cpu, cuda, cuda:N or mps" in err


def test_a_conversation_file_that_is_not_utf8_is_named(saved, tmp_path, capsys, no_model_load):
    latin = tmp_path / "latin1.json"
    latin.write_bytes(json.dumps([QA[0], {"role": "assistant", "content": "Très bien"}], ensure_ascii=False)
                      .encode("latin-1"))
    err = _refused(["monitor", str(latin), *saved["args"]], capsys)
    assert f"{latin} is not UTF-8 text (byte 0xe8" in err and "save it as UTF-8" in err
    with pytest.raises(ValueError, match=r"latin1\.json is not UTF-8"):
        read_utf8(latin)


def test_ctrl_c_leaves_chat_quietly_and_other_commands_in_one_line(saved, monkeypatch, capsys):
    def interrupt(_prompt: str = "") -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupt)
    assert main(["chat", *saved["args"]]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out and "interrupted" not in captured.err

    monkeypatch.setattr("anchor.monitor.read_conversations", lambda _path: interrupt())
    assert main(["monitor", str(saved["conv"]), *saved["args"]]) == 130
    assert capsys.readouterr().err.strip() == "anchor monitor: interrupted."


def test_layers_path_reaches_load_model_and_the_error_names_the_option(saved, capsys, monkeypatch):
    seen = {}

    def unknown_architecture(name, device=None, dtype=None, layers_path=None):
        seen["layers_path"] = layers_path
        raise ValueError("Cannot find the decoder layers of model_type='odd'; pass layers_path='<dotted path>'.")

    monkeypatch.setattr("anchor.models.load_model", unknown_architecture)
    err = _refused(["monitor", str(saved["conv"]), *saved["args"], "--layers-path", "backbone.blocks"], capsys)
    assert seen == {"layers_path": "backbone.blocks"}
    assert err.endswith("On the command line: --layers-path DOTTED.PATH.")


def test_shared_options_default_to_the_embedded_model():
    from anchor.cli import build_parser
    from anchor.commands.options import DEFAULT_MODEL
    from anchor.models import EMBEDDED

    assert DEFAULT_MODEL == EMBEDDED
    parser = build_parser()
    for argv in (["data", "--out", "x"], ["calibrate", "--axis", "x"], ["monitor", "c.json"], ["chat"],
                 ["generate", "--in", "i", "--out", "o"], ["eval", "drift"]):
        args = parser.parse_args(argv)
        assert (args.model, args.device, args.dtype, args.layers_path) == (EMBEDDED, None, None, None), argv


def test_the_docs_example_runs(tmp_path):
    text = (ROOT / "docs" / "bad-inputs.md").read_text()
    code = text.split("```python\n")[1].split("```")[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "PYTHONPATH": str(ROOT), "NETRC": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "{'per_turn': [0.5, None]}" in done.stdout and "logs offline" in done.stdout


# ----------------------------------------------------------------------------------------------------------------
# 12. No silent waits
# ----------------------------------------------------------------------------------------------------------------


def test_anchor_data_without_axis_says_what_it_computes_first(saved, tiny_axis, tmp_path, monkeypatch, capsys):
    import anchor.data

    monkeypatch.setenv("ANCHOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(anchor.data, "role_search_axis", lambda *args, **kwargs: tiny_axis)
    out = tmp_path / "data"
    code = main(["data", "--model", str(saved["model"]), "--out", str(out), "--roles", "1", "--questions", "2",
                 "--max-new-tokens", "2", "--quiet"])
    captured = capsys.readouterr()
    text = captured.out
    assert "No --axis: first ranking every shipped role along this model's Assistant Axis" in text
    assert "answers of up to 8 tokens" in text
    assert "--axis DIR or --role-names skip this" in text and "Building persona data: 1 roles × 2 questions" in text
    assert code == 0 and (out / "data_config.json").is_file(), captured.err


def test_a_models_context_is_read_from_its_config(tiny_tokenizer):
    from anchor.monitor import context_length

    assert context_length(make_tiny_model(tiny_tokenizer)) == 512
