"""The training entry point behind ``scripts/train.py`` and ``anchor train``: one YAML recipe → one anchored run.

A recipe is parsed by ``trl.TrlParser`` over four dataclasses, so every field of each can be set in the YAML or
overridden on the command line (``--field value``):

* :class:`RecipeArguments` (here; TRL has its own ``ScriptArguments``, hence the name): the trainer kind
  (``sft``/``dpo``), the data, whether the anchor is attached,
  the held-out evaluation and ``compare``;
* ``trl.SFTConfig`` or ``trl.DPOConfig`` (picked by ``trainer`` before the real parse, because the parser needs a
  fixed tuple of dataclasses): everything the trainer does, output_dir and report_to included;
* ``trl.ModelConfig``: the model (``model_name_or_path``: a hub id, a local directory or ``smollm2``, the embedded
  default) and LoRA (``use_peft``, ``lora_r``, ...);
* :class:`anchor.callback.AnchorConfig`: the anchor (``method``, ``weight``, ``layers``, probes, the axis).

The same entry runs under ``accelerate launch --config_file configs/<setup>.yaml scripts/train.py --config
recipes/<recipe>.yaml`` and as plain ``python scripts/train.py --config ...``.

**Unanchored twin.** ``--weight 0`` is the one switch: training is then bit-identical to no anchor, while the
callback still measures probe drift, so both runs are measured the same way. ``--compare`` runs the twin first
(into ``<output_dir>-unanchored``), then the recipe, and prints a before/after table. ``anchor: false`` leaves the
callback out altogether (a plain TRL run, no probes).

**Data.** ``dataset`` is a JSONL file (chat ``messages``/``prompt``+``completion``/``text`` for SFT; TRL's
``prompt``/``chosen``/``rejected`` for DPO) or a directory of persona-implant data (:mod:`anchor.data`), which is
built there from the model itself, once, when missing and ``build_data`` is on.

**Every run ends with a summary** (printed, and in ``<output_dir>/summary.json``): probe drift per domain (the
callback's last probe, a z-score against step 0), the train and held-out task loss, the held-out default-persona
measures of the base and the tuned model (:func:`default_persona_drift`), and where the model, checkpoints, axis
bundle, plot (``probe_drift.png``) and wandb run are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anchor.axis import CONFIG_NAME as AXIS_CONFIG
from anchor.axis import AssistantAxis, cached_axis
from anchor.callback import AnchorCallback, AnchorConfig
from anchor.data import DEFAULTS as DATA_DEFAULTS
from anchor.data import PersonaData, build_persona_data, read_jsonl, role_search_axis
from anchor.io import atomic_write_json, atomic_write_text, nan_to_none
from anchor.models import EMBEDDED, fingerprint, load_model
from anchor.reference import Reference, find_peft
from anchor.report import (
    RunSummary,
    comparison_table,
    default_persona_drift,
    drift_shares,
    last_probe_drift,
    plot_probe_drift,
    shares_sentence,
)
from anchor.tracking import configure_wandb

logger = logging.getLogger(__name__)

TRAINERS = ("sft", "dpo")
SUMMARY_NAME = "summary.json"
PLOT_NAME = "probe_drift.png"
AXIS_DIR = "axis"
TWIN_SUFFIX = "-unanchored"


@dataclass
class RecipeArguments:
    """What a recipe says besides the trainer, model and anchor configs."""

    trainer: str = field(default="sft", metadata={"help": "sft or dpo (picks SFTConfig or DPOConfig)."})
    dataset: str = field(default="outputs/data/persona-smollm2", metadata={
        "help": "A JSONL file, or a directory of persona-implant data (anchor data), built there when missing."})
    eval_dataset: str | None = field(default=None, metadata={
        "help": "JSONL of held-out examples for the task loss (default: the persona data's held-out split)."})
    build_data: bool = field(default=True, metadata={
        "help": "Build the persona data into `dataset` from the model itself when the directory is missing."})
    persona_roles: int = field(
        default=DATA_DEFAULTS.n_roles, metadata={"help": "Persona data: number of far roles to implant."})
    persona_role_names: list[str] | None = field(default=None, metadata={
        "help": "Persona data: implant these roles instead of the axis's farthest ones."})
    persona_questions: int = field(
        default=DATA_DEFAULTS.n_questions, metadata={"help": "Persona data: shipped questions sampled."})
    persona_heldout_fraction: float = field(
        default=DATA_DEFAULTS.heldout_fraction, metadata={"help": "Persona data: share of questions held out."})
    persona_max_new_tokens: int = field(
        default=DATA_DEFAULTS.max_new_tokens, metadata={"help": "Persona data: tokens generated per answer."})
    persona_seed: int = field(default=0, metadata={"help": "Persona data: seed of the question sample and split."})
    anchor: bool = field(default=True, metadata={
        "help": "Attach the AnchorCallback. For an unanchored twin keep it on and set --weight 0 (same measurements, "
                "training bit-identical to no anchor); false gives a plain TRL run without probes."})
    eval_drift: bool = field(default=True, metadata={
        "help": "After training, answer the held-out default-persona questions with the base and the tuned model and "
                "measure their projections and role-likeness (persona data only)."})
    eval_questions: int | None = field(default=None, metadata={
        "help": "Held-out drift: use at most this many questions (default: all held-out ones)."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Held-out drift: tokens generated per answer."})
    eval_layers: list[int] | None = field(default=None, metadata={
        "help": "Held-out drift: layers reported (default: a quarter, half and three quarters deep, and the last)."})
    compare: bool = field(default=False, metadata={
        "help": f"Run the unanchored twin (weight 0, into <output_dir>{TWIN_SUFFIX}) first, then this recipe, and "
                "print a before/after table with a joint probe-drift plot."})

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer={self.trainer!r}; choose one of {TRAINERS}.")


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------


def trainer_config_class(kind: str) -> type:
    from trl import DPOConfig, SFTConfig

    if kind not in TRAINERS:
        raise ValueError(f"trainer={kind!r}; choose one of {TRAINERS}.")
    return {"sft": SFTConfig, "dpo": DPOConfig}[kind]


def trainer_kind(argv: Sequence[str]) -> str:
    """``--trainer`` from the command line, else ``trainer:`` from the ``--config`` YAML, else ``sft``."""
    import yaml

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--trainer")
    known, _ = pre.parse_known_args(list(argv))
    if known.trainer:
        return known.trainer
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise FileNotFoundError(f"No such recipe: {path}. Recipes live in recipes/*.yaml.")
        try:
            recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise ValueError(f"{path} is not valid YAML{line}: {getattr(err, 'problem', err)}. Fix the recipe "
                             "(recipes/*.yaml show the format).") from None
        if not isinstance(recipe, dict):
            raise ValueError(f"{path} must hold a YAML mapping of field: value.")
        return str(recipe.get("trainer", "sft"))
    return "sft"


def parse_args(argv: Sequence[str] | None = None) -> tuple[RecipeArguments, Any, Any, AnchorConfig]:
    """``(script_args, trainer_config, model_config, anchor_config)`` from a ``--config`` recipe and overrides."""
    import sys

    from trl import ModelConfig, TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser((RecipeArguments, trainer_config_class(trainer_kind(argv)), ModelConfig, AnchorConfig))
    return tuple(parser.parse_args_and_config(args=argv))


# ---------------------------------------------------------------------------------------------------------------
# The axis and the data
# ---------------------------------------------------------------------------------------------------------------


def _state() -> Any:
    from accelerate import PartialState

    return PartialState()


def resolve_axis(model: nn.Module, tokenizer: object, config: AnchorConfig, progress: bool = True) -> AssistantAxis:
    """``config.axis``, or the model's axis from the one cache (:func:`anchor.axis.cached_axis`, computed with
    ``config``'s ``axis_*`` settings). The main process computes it first; the others then read the cache, so all
    anchor to the same numbers. Interrupted extractions resume from their shards.
    """
    if config.axis:
        if not (Path(config.axis) / AXIS_CONFIG).is_file():
            raise FileNotFoundError(f"axis={config.axis!r} holds no {AXIS_CONFIG}; make one with `anchor axis --out "
                                    f"{config.axis}`, or leave axis unset to compute it on the fly.")
        axis = AssistantAxis.from_pretrained(config.axis)
    else:
        state = _state()
        with state.main_process_first():
            axis = cached_axis(model, tokenizer, config.axis_settings(), config.axis_batch_size,
                               progress=progress and state.is_main_process)
    axis.check_compatible(model, check_weights=config.axis_check_weights)
    return axis


def _is_data_dir(path: str) -> bool:
    return Path(path).suffix.lower() not in (".jsonl", ".json")


def _data_settings(args: RecipeArguments) -> dict[str, Any]:
    return {"n_roles": args.persona_roles, "n_questions": args.persona_questions,
            "heldout_fraction": args.persona_heldout_fraction, "max_new_tokens": args.persona_max_new_tokens,
            "seed": args.persona_seed, "role_names": list(args.persona_role_names) if args.persona_role_names else None}


def prepare_persona_data(args: RecipeArguments, model: nn.Module, tokenizer: object,
                         axis: AssistantAxis | None, zero3: bool = False) -> PersonaData:
    """The persona data in ``args.dataset``: read it, or (main process first) build it there from the model.

    The roles are ``args.persona_role_names``, or the farthest from the Assistant on ``axis`` (the user's bundle), or
    else on the role-search axis (:data:`anchor.data.ROLE_SEARCH`): the on-the-fly training axis samples too few
    roles to search. Under DeepSpeed ZeRO-3 (``zero3``, as :func:`train` found it) the model cannot run before the
    trainer, so there is no role search."""
    directory = Path(args.dataset)
    with _state().main_process_first():
        if not (directory / "data_config.json").is_file():
            if not args.build_data:
                raise FileNotFoundError(f"{directory} holds no persona data and build_data is off; build it with "
                                        f"`anchor data --out {directory}` or point dataset at your JSONL.")
            if axis is None and not args.persona_role_names and not zero3:
                axis = role_search_axis(model, tokenizer, progress=_state().is_main_process)
            if axis is None and not args.persona_role_names:
                raise RuntimeError(
                    f"Building the persona data in {directory} needs the axis, which cannot be computed before "
                    "training under DeepSpeed ZeRO-3. Build it first with `anchor data --out DIR` (one process) and "
                    "pass --dataset DIR.")
            logger.info("anchor: building persona-implant data in %s", directory)
            s = _data_settings(args)
            data = build_persona_data(model, tokenizer, axis, n_roles=s["n_roles"], n_questions=s["n_questions"],
                                      heldout_fraction=s["heldout_fraction"], max_new_tokens=s["max_new_tokens"],
                                      seed=s["seed"], role_names=s["role_names"],
                                      progress=_state().is_main_process)
            if _state().is_main_process:
                data.save(directory)
            return data
    data = PersonaData.load(directory)
    if args.build_data:  # the recipe owns this directory: refuse data built with other settings or another model
        built, wanted = data.metadata.get("settings"), _data_settings(args)
        current = fingerprint(model)  # "cfg-…" when the weights are sharded (ZeRO-3, FSDP): the config only
        if built != wanted or (not current.startswith("cfg-") and data.metadata.get("fingerprint") != current):
            raise ValueError(
                f"{directory} was built with {built} from model {data.metadata.get('fingerprint')}, but this recipe "
                f"asks for {wanted} from {current}. Delete the directory to rebuild it, point dataset at "
                "another one, or set build_data false to use it as it is.")
    return data


def _records_to_rows(records: list[dict[str, Any]], kind: str, source: str, keep_turns: bool) -> list[dict]:
    """Keep the columns the trainer reads; split SFT chat ``messages`` into prompt + completion (see below)."""
    if not records:
        raise ValueError(f"{source} holds no records.")
    rows = []
    for i, r in enumerate(records):
        where = f"{source}, record {i}"
        if kind == "dpo":
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in r]
            if missing:
                raise ValueError(f"{where}: a DPO record needs prompt, chosen and rejected; {missing} missing.")
            rows.append({k: r[k] for k in ("prompt", "chosen", "rejected")})
        elif "messages" in r:
            msgs = r["messages"]
            if keep_turns or not msgs or msgs[-1].get("role") != "assistant":
                rows.append({"messages": msgs})
            else:
                # Loss on the answer only (TRL's completion_only_loss on prompt-completion data), so the template's
                # injected system prompt and the question are not trained on, nor anchored.
                rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
        elif "prompt" in r and "completion" in r:
            rows.append({"prompt": r["prompt"], "completion": r["completion"]})
        elif "text" in r:
            rows.append({"text": r["text"]})
        else:
            raise ValueError(f"{where}: an SFT record needs messages, prompt+completion, or text; got {sorted(r)}.")
    if len({tuple(sorted(row)) for row in rows}) > 1:
        raise ValueError(f"{source} mixes record formats; use one format per file.")
    return rows


def load_datasets(args: RecipeArguments, training_args: Any, persona: PersonaData | None) -> tuple[Any, Any]:
    """(train, eval) ``datasets.Dataset`` for the trainer kind; eval is None when there is no held-out data."""
    from datasets import Dataset

    keep_turns = bool(getattr(training_args, "assistant_only_loss", False))
    if persona is not None:
        train = persona.split(f"{args.trainer}_train")
        heldout = persona.split(f"{args.trainer}_heldout")
        source = args.dataset
    else:
        train, heldout, source = read_jsonl(args.dataset), None, args.dataset
    if args.eval_dataset:
        heldout, eval_source = read_jsonl(args.eval_dataset), args.eval_dataset
    else:
        eval_source = f"{source} (held-out split)"
    train_ds = Dataset.from_list(_records_to_rows(train, args.trainer, source, keep_turns))
    eval_ds = Dataset.from_list(_records_to_rows(heldout, args.trainer, eval_source, keep_turns)) if heldout else None
    return train_ds, eval_ds


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------


def _wandb_run_dir() -> str | None:
    """The local directory of the active wandb run (what ``wandb sync`` takes), finishing the run."""
    try:
        import wandb
    except ImportError:
        return None
    run = wandb.run
    if run is None:
        return None
    directory = str(Path(run.dir).parent)
    wandb.finish()
    return directory


def _reference_for(model: nn.Module, model_args: Any, device: torch.device) -> Reference:
    """The frozen base model: the adapter-disabled model with PEFT, else the base weights reloaded."""
    if find_peft(model) is not None:
        return Reference(model)
    base, _ = load_model(model_args.model_name_or_path or EMBEDDED, device=device, dtype=model_args.dtype)
    return Reference(model, frozen=base)


def train(script_args: RecipeArguments, training_args: Any, model_args: Any, anchor_config: AnchorConfig,
          label: str = "run") -> RunSummary:
    """Load the model, prepare the data, train with the anchor, evaluate, and write the summary and plot."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    from trl import DPOTrainer, SFTTrainer, get_peft_config

    start = time.perf_counter()
    state = _state()
    if not training_args.run_name:
        training_args.run_name = Path(training_args.output_dir).name
    tracking = configure_wandb(training_args.output_dir, training_args.report_to,
                               resume=bool(training_args.resume_from_checkpoint))
    if tracking and state.is_main_process:
        print(tracking, flush=True)
    model, tokenizer = load_model(model_args.model_name_or_path or EMBEDDED, dtype=model_args.dtype)
    zero3 = is_deepspeed_zero3_enabled()
    if not zero3:  # under ZeRO-3 the model is partitioned at load; only the trainer may run it
        model.to(training_args.device)
    axis = None if zero3 else resolve_axis(model, tokenizer, anchor_config, progress=state.is_main_process)
    bundle = axis if anchor_config.axis else None  # a role search reads the user's bundle, never the on-the-fly axis
    persona = (prepare_persona_data(script_args, model, tokenizer, bundle, zero3)
               if _is_data_dir(script_args.dataset) else None)
    train_ds, eval_ds = load_datasets(script_args, training_args, persona)

    callback = AnchorCallback(anchor_config, axis=axis) if script_args.anchor else None
    trainer_cls = {"sft": SFTTrainer, "dpo": DPOTrainer}[script_args.trainer]
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, peft_config=get_peft_config(model_args),
                          callbacks=[callback] if callback is not None else None)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    heldout_loss = trainer.evaluate().get("eval_loss") if eval_ds is not None else None
    trainer.save_state()  # trainer_state.json: the log history the plots are drawn from
    history = trainer.state.log_history
    out = Path(training_args.output_dir)
    paths = {"model": str(out), "checkpoints": f"{out}/checkpoint-*" if any(out.glob("checkpoint-*")) else "none"}

    drift = None
    sharded = zero3 or getattr(trainer, "is_fsdp_enabled", False)  # one process alone cannot run a sharded model
    can_measure = script_args.eval_drift and persona is not None and axis is not None and not sharded
    if script_args.eval_drift and sharded and state.is_main_process:
        logger.warning("anchor: the held-out drift evaluation is skipped: the model is sharded (ZeRO-3/FSDP). "
                       "Measure the saved model with `anchor eval`.")
    if state.is_main_process and can_measure:
        questions = persona.drift_questions[: script_args.eval_questions]
        role_prompts = [prompts[0] for prompts in persona.roles.values()]
        print(f"anchor: measuring the default persona after training: the base and the tuned model answer "
              f"{len(questions)} held-out questions ({script_args.eval_max_new_tokens} tokens each)...", flush=True)
        drift = default_persona_drift(
            trainer.model, _reference_for(trainer.model, model_args, training_args.device), tokenizer, axis,
            questions, role_prompts, script_args.eval_layers, script_args.eval_max_new_tokens,
            anchor_config.probe_batch_size)
    state.wait_for_everyone()

    anchor_axis = callback.axis if callback is not None else axis
    if state.is_main_process and anchor_axis is not None:
        anchor_axis.save_pretrained(out / AXIS_DIR)
        paths["axis bundle"] = str(out / AXIS_DIR)
    plot = plot_probe_drift({label: history}, out / PLOT_NAME, anchor_config.log_prefix) \
        if state.is_main_process else None
    if plot is not None:
        paths["plot"] = str(plot)
    anchor_info = None
    if callback is not None and callback.anchor is not None:
        anchor_info = {"method": anchor_config.method, "weight": anchor_config.weight,
                       "method_weights": anchor_config.weights(), "layers": list(callback.anchor.layers)}
    summary = RunSummary(
        label=label, output_dir=str(out), trainer=script_args.trainer, peft=bool(model_args.use_peft),
        anchor=anchor_info, steps=trainer.state.global_step, seconds=time.perf_counter() - start,
        train_loss=float(result.training_loss), heldout_loss=float(heldout_loss) if heldout_loss is not None else None,
        probe_drift=last_probe_drift(history, anchor_config.log_prefix), drift=drift, paths=paths,
    )
    if state.is_main_process:
        summary.paths["summary"] = str(out / SUMMARY_NAME)
        wandb_dir = _wandb_run_dir()
        if wandb_dir is not None:
            summary.paths["wandb"] = f"{wandb_dir} (offline: upload with `wandb sync {wandb_dir}`)" \
                if os.environ.get("WANDB_MODE") == "offline" else wandb_dir
        summary.save(out / SUMMARY_NAME)
        print(summary.render(), flush=True)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Anchored vs unanchored
# ---------------------------------------------------------------------------------------------------------------


def compare(argv: Sequence[str]) -> dict[str, RunSummary]:
    """Run the unanchored twin (``--weight 0``) and then the recipe as given; write and print the comparison."""
    script_args, training_args, model_args, anchor_config = parse_args(argv)
    if not script_args.anchor:
        raise ValueError("--compare needs the anchor (anchor: true): both runs are measured by its probes.")
    twin_dir = training_args.output_dir.rstrip("/") + TWIN_SUFFIX
    twin = parse_args([*argv, "--weight", "0", "--output_dir", twin_dir, "--run_name", Path(twin_dir).name])
    runs = {"unanchored": train(*twin, label="unanchored")}
    runs["anchored"] = train(script_args, training_args, model_args, anchor_config, label="anchored")
    state = _state()
    if state.is_main_process:
        out = Path(training_args.output_dir)
        table = comparison_table(runs)
        histories = {label: json.loads((Path(run.output_dir) / "trainer_state.json").read_text())["log_history"]
                     for label, run in runs.items()}
        plot = plot_probe_drift(histories, out / "comparison.png", anchor_config.log_prefix)
        shares = drift_shares(runs, "anchored", "unanchored")
        note = ("Position: mean projection of each model's own greedy answers to held-out questions (no system "
                "prompt), relative to the axis's default mean, in default-to-role gaps (0 = Assistant, -1 = average "
                "role). Role-likeness: frozen base NLL(answer | default) − NLL(answer | training role prompt), "
                "averaged over the implanted roles. Probe drift: the callback's last probe, z against step 0.")
        text = "\n".join([f"# Anchored vs unanchored: {training_args.output_dir}", "", table, "", note, "",
                          shares_sentence(shares)]).rstrip()
        atomic_write_text(out / "comparison.md", text + "\n")
        atomic_write_json(out / "comparison.json", nan_to_none(
            {label: dataclasses.asdict(run) for label, run in runs.items()} | {"drift_shares": shares}))
        print("\n" + text)
        print(f"Comparison: {out / 'comparison.md'}" + (f", plot {plot}" if plot else ""), flush=True)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Parse a recipe and run it (``--compare``: the unanchored twin first, then the recipe)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    script_args, training_args, model_args, anchor_config = parse_args(argv)
    if script_args.compare:
        compare(argv)
    else:
        anchored = script_args.anchor and anchor_config.weight > 0
        train(script_args, training_args, model_args, anchor_config, label="anchored" if anchored else "unanchored")
    return 0


__all__ = ["RecipeArguments", "compare", "main", "parse_args", "prepare_persona_data", "resolve_axis", "train"]
