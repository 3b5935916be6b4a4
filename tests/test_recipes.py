"""Recipes and accelerate configs: every one parses; the CPU recipes train a few steps on a tiny model; a 2-process
CPU launch and a shortened quickstart run end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from anchor.callback import AnchorConfig
from anchor.report import (
    RunSummary,
    comparison_table,
    drift_shares,
    plot_probe_drift,
    probe_drift_series,
    shares_sentence,
)
from anchor.train import RecipeArguments, _records_to_rows, main, parse_args, trainer_kind
from tests.conftest import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CPU_RECIPES = ["quickstart", "sft-lora", "sft-full", "dpo-lora"]
GPU_RECIPES = ["qwen2.5-7b-sft-lora"]


def _parse(recipe: Path, *extra: str) -> tuple:
    """Parse a recipe; a GPU recipe is parsed with --use_cpu true where there is no GPU (bf16 needs one or the CPU)."""
    cpu = ["--use_cpu", "true"] if recipe.stem in GPU_RECIPES and not torch.cuda.is_available() else []
    return parse_args(["--config", str(recipe), *cpu, *extra])


def _header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


# ----------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------


def test_recipe_set_is_complete():
    assert {p.stem for p in RECIPES} == set(CPU_RECIPES + GPU_RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_documents_itself(recipe):
    raw = yaml.safe_load(recipe.read_text())
    script, trainer, model, anchor = _parse(recipe)
    assert isinstance(script, RecipeArguments) and isinstance(anchor, AnchorConfig)
    assert type(trainer).__name__ == {"sft": "SFTConfig", "dpo": "DPOConfig"}[raw["trainer"]]
    assert trainer.output_dir == raw["output_dir"] and model.model_name_or_path == raw["model_name_or_path"]
    methods = [raw["method"]] if isinstance(raw["method"], str) else raw["method"]  # one name, or a composition
    assert anchor.method == methods and anchor.weight == raw["weight"] > 0
    header = _header(recipe)
    assert len(header.splitlines()) >= 5 and "--weight 0" in header  # documented, with its unanchored switch
    # The one-flag unanchored twin, and command-line overrides beating the YAML.
    *_, twin = _parse(recipe, "--weight", "0")
    assert twin.weight == 0 and twin.method == anchor.method
    _, overridden, _, _ = _parse(recipe, "--learning_rate", "0.125")
    assert overridden.learning_rate == 0.125


def test_cpu_recipes_stay_on_cpu_and_the_gpu_recipe_is_bf16():
    for recipe in RECIPES:
        _, trainer, model, _ = _parse(recipe)
        if recipe.stem in CPU_RECIPES:
            assert trainer.use_cpu and not trainer.bf16 and model.model_name_or_path == "smollm2"
        else:
            assert yaml.safe_load(recipe.read_text())["use_cpu"] is False
            assert trainer.bf16 and model.dtype == "bfloat16" and "7B" in model.model_name_or_path


def test_trainer_kind_and_unknown_fields(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer: dpo\noutput_dir: x\nuse_cpu: true\n")
    assert trainer_kind(["--config", str(recipe)]) == "dpo"
    assert trainer_kind(["--config", str(recipe), "--trainer", "sft"]) == "sft"
    _, trainer, _, _ = parse_args(["--config", str(recipe)])
    assert type(trainer).__name__ == "DPOConfig"
    recipe.write_text("trainer: sft\noutput_dir: x\nuse_cpu: true\nlerning_rate: 0.1\n")
    with pytest.raises(ValueError, match="lerning_rate"):
        parse_args(["--config", str(recipe)])
    recipe.write_text("trainer: ppo\n")
    with pytest.raises(ValueError, match="trainer"):
        parse_args(["--config", str(recipe)])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_parses_and_says_when_to_use_it(config):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    assert isinstance(yaml.safe_load(config.read_text()), dict)
    parsed = load_config_from_file(str(config))
    assert isinstance(parsed, ClusterConfig)
    assert "Use it" in _header(config)
    assert config.name in (ROOT / "configs" / "README.md").read_text()


def test_config_set_covers_the_setups():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = set()
    for config in CONFIGS:
        c = load_config_from_file(str(config))
        kinds.add((str(c.distributed_type).split(".")[-1], (c.deepspeed_config or {}).get("zero_stage"),
                   c.num_processes if c.use_cpu else None))
    assert kinds == {("NO", None, None), ("MULTI_CPU", None, 2), ("MULTI_GPU", None, None),
                     ("DEEPSPEED", 2, None), ("DEEPSPEED", 3, None), ("FSDP", None, None)}


# ----------------------------------------------------------------------------------------------------------------
# Data formats and summaries
# ----------------------------------------------------------------------------------------------------------------


def test_chat_messages_become_prompt_and_completion():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert _records_to_rows([{"messages": msgs, "role": "bard"}], "sft", "x", keep_turns=False) == [
        {"prompt": msgs[:1], "completion": msgs[1:]}]
    # assistant_only_loss keeps whole conversations; a conversation not ending with the assistant stays as it is.
    assert _records_to_rows([{"messages": msgs}], "sft", "x", keep_turns=True) == [{"messages": msgs}]
    assert _records_to_rows([{"messages": msgs[:1]}], "sft", "x", keep_turns=False) == [{"messages": msgs[:1]}]
    dpo = {"prompt": msgs[:1], "chosen": msgs[1:], "rejected": msgs[1:], "role": "bard"}
    assert _records_to_rows([dpo], "dpo", "x", keep_turns=False) == [{k: dpo[k] for k in ("prompt", "chosen",
                                                                                          "rejected")}]
    with pytest.raises(ValueError, match="record 0"):
        _records_to_rows([{"prompt": msgs[:1]}], "dpo", "x", keep_turns=False)
    with pytest.raises(ValueError, match="mixes"):
        _records_to_rows([{"messages": msgs}, {"text": "t"}], "sft", "x", keep_turns=False)


def test_probe_drift_series_and_plot(tmp_path):
    history = [{"loss": 1.0, "step": 1}, {"anchor/probe_drift": -0.5, "anchor/probe_drift/coding": -0.25, "step": 2},
               {"anchor/probe_drift": -1.0, "anchor/probe_drift/coding": -0.5, "step": 4}]
    series = probe_drift_series(history)
    assert series == {"all": [(0, 0.0), (2, -0.5), (4, -1.0)], "coding": [(0, 0.0), (2, -0.25), (4, -0.5)]}
    assert plot_probe_drift({"a": history, "b": history[:2]}, tmp_path / "p.png").stat().st_size > 1000
    assert plot_probe_drift({"a": history[:1]}, tmp_path / "none.png") is None


# ----------------------------------------------------------------------------------------------------------------
# Running on CPU (tiny model)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory, tiny_tokenizer):
    """A saved tiny model, its own axis cache and persona-data directory, and one torch thread."""
    root = tmp_path_factory.mktemp("recipes")
    model_dir = root / "tiny"
    make_tiny_model(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    saved = {k: os.environ.get(k) for k in ("ANCHOR_CACHE", "WANDB_MODE")}
    os.environ.update(ANCHOR_CACHE=str(root / "cache"), WANDB_MODE="offline")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield root, model_dir
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _tiny_overrides(root: Path, model_dir: Path, out: Path, steps: int = 2) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dtype", "float32", "--dataset", str(root / "data"),
            "--persona_roles", "2", "--persona_role_names", "vampire_lord", "dark_lord", "--persona_questions", "6",
            "--persona_heldout_fraction", "0.34",
            "--persona_max_new_tokens", "4", "--eval_max_new_tokens", "4", "--output_dir", str(out),
            "--max_steps", str(steps), "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--max_length", "96", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--use_cpu", "true", "--bf16", "false", "--activation_checkpointing", "false", "--disable_tqdm", "true",
            "--layers", "1", "2", "--probe_every", str(steps), "--probe_max_new_tokens", "4", "--probe_batch_size",
            "32", "--axis_n_roles", "3", "--axis_n_questions", "3", "--axis_max_new_tokens", "3",
            "--lora_target_modules", "q_proj", "v_proj"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CPU_RECIPES)
def test_cpu_recipe_trains_a_few_steps(tiny_env, name, tmp_path):
    root, model_dir = tiny_env
    out = tmp_path / "out"
    assert main(["--config", str(ROOT / "recipes" / f"{name}.yaml"), *_tiny_overrides(root, model_dir, out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    recipe = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    assert summary["steps"] == 2 and summary["trainer"] == recipe["trainer"]
    methods = [recipe["method"]] if isinstance(recipe["method"], str) else recipe["method"]  # one, or composed
    assert summary["anchor"]["method"] == methods and summary["anchor"]["layers"] == [1, 2]
    assert set(summary["probe_drift"]) >= {"all", "coding", "writing", "emotional", "meta"}
    assert summary["heldout_loss"] is not None and summary["drift"]["layers"] == [1, 2, 3]
    for who in ("base", "tuned"):
        assert len(summary["drift"][who]["position"]) == 3 and summary["drift"][who]["role_likeness"] is not None
    assert (out / "probe_drift.png").is_file() and (out / "axis" / "axis_config.json").is_file()
    assert (out / ("adapter_config.json" if recipe["use_peft"] else "config.json")).is_file()


@pytest.mark.slow
def test_data_built_with_other_settings_is_refused(tiny_env, tmp_path):
    root, model_dir = tiny_env
    argv = ["--config", str(ROOT / "recipes" / "quickstart.yaml"), *_tiny_overrides(root, model_dir, tmp_path)]
    main(argv)  # builds (or reuses) the data with the tiny settings
    with pytest.raises(ValueError, match="Delete the directory"):
        main([*argv, "--persona_questions", "5"])


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run in a new session so that a timeout ends the whole process group (accelerate's workers included)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:2]} ran past {timeout} s; stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _subprocess_env(root: Path) -> dict[str, str]:
    env = dict(os.environ, ANCHOR_CACHE=str(root / "cache"), WANDB_MODE="offline", WANDB_SILENT="true",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.slow
def test_two_cpu_processes_with_accelerate(tiny_env, tmp_path):
    root, model_dir = tiny_env
    out = tmp_path / "ddp"
    cmd = ["accelerate", "launch", "--config_file", str(ROOT / "configs" / "multi_cpu.yaml"),
           str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "recipes" / "quickstart.yaml"),
           *_tiny_overrides(root, model_dir, out, steps=4)]
    done = _run(cmd, _subprocess_env(root), timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["drift"] is not None
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("anchor/probe_drift" in h for h in history) and any("anchor/proj/layer_1" in h for h in history)
    assert done.stdout.count("== anchored:") == 1  # one summary, from the main process


@pytest.mark.slow
def test_shortened_quickstart_end_to_end(tiny_env, tmp_path):
    """scripts/quickstart.sh with tiny budgets (tiny model): both runs, the table, plots, checkpoints, wandb files."""
    root, model_dir = tiny_env
    out, wandb_dir = tmp_path / "qs", tmp_path / "wandb"
    wandb_dir.mkdir()
    overrides = [*_tiny_overrides(root, model_dir, out, steps=4), "--probe_every", "2", "--save_strategy", "steps",
                 "--save_steps", "4", "--report_to", "wandb"]
    env = _subprocess_env(root) | {"QUICKSTART_SETUP": "0", "WANDB_DIR": str(wandb_dir)}
    done = _run(["bash", str(ROOT / "scripts" / "quickstart.sh"), *overrides], env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| unanchored |" in done.stdout and "| anchored |" in done.stdout and "wandb sync" in done.stdout
    twin = Path(f"{out}-unanchored")
    for run in (out, twin):
        assert (run / "summary.json").is_file() and (run / "probe_drift.png").is_file()
        assert list(run.glob("checkpoint-4/anchor/axis_config.json"))
    assert (out / "comparison.png").stat().st_size > 1000 and "| base (before) |" in (out / "comparison.md").read_text()
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(list(r.glob("run-*.wandb")) for r in runs)
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["unanchored"]["anchor"]["weight"] == 0 and comparison["anchored"]["anchor"]["weight"] > 0
    runs = {k: RunSummary(**v) for k, v in comparison.items() if k != "drift_shares"}
    assert comparison_table(runs).count("\n") == 4  # header, rule, base, unanchored, anchored
    assert RunSummary.load(out / "summary.json") == runs["anchored"]


def _summary(label: str, position: list[float], role_likeness: float, heldout: float) -> RunSummary:
    base = {"position": [-0.2, -0.2], "role_likeness": -0.3}
    drift = {"layers": [7, 15], "n_questions": 8, "base": base,
             "tuned": {"position": position, "role_likeness": role_likeness}}
    return RunSummary(label, "out", "sft", True, None, 4, 1.0, 1.0, heldout, {}, drift, {})


def test_drift_shares_of_an_anchored_run_that_overshot():
    runs = {"unanchored": _summary("unanchored", [-1.2, -0.8], 0.1, 1.0),   # moved -0.8 on average, +0.4 role-like
            "anchored": _summary("anchored", [-0.1, 0.1], -0.4, 1.2)}       # moved +0.2, -0.1: past the base
    shares = drift_shares(runs, "anchored", "unanchored")
    assert shares["projection"] == pytest.approx(0.4 / -1.6)
    assert shares["role_likeness"] == pytest.approx(-0.1 / 0.4)
    assert shares["task_loss_change"] == pytest.approx(0.2)
    text = shares_sentence(shares)
    assert "projection (mean over the reported layers) -25%" in text and "role-likeness -25%" in text
    assert "overshot toward the Assistant" in text and "task loss +20%" in text
    # an unanchored run that did not move gives no ratio
    still = {"unanchored": _summary("unanchored", [-0.2, -0.2], -0.3, 1.0), "anchored": runs["anchored"]}
    assert drift_shares(still, "anchored", "unanchored")["projection"] is None


def test_a_recipe_that_is_not_yaml_is_named_with_its_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("trainer: sft\nmethod: [preventative, lm_replay\nweight: 1.0\n")
    with pytest.raises(ValueError, match=r"broken.yaml is not valid YAML at line \d+, column \d+"):
        trainer_kind(["--config", str(recipe)])


def test_sft_data_given_to_a_dpo_recipe_is_refused_with_the_record_and_the_missing_keys():
    records = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    with pytest.raises(ValueError, match=r"data.jsonl, record 0: a DPO record needs prompt, chosen and rejected"):
        _records_to_rows(records, "dpo", "data.jsonl", keep_turns=False)
