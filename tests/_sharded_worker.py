"""One rank of the sharded tests (``tests/test_sharded.py``): the tiny model trained with the anchor under DeepSpeed
ZeRO (through ``accelerate launch`` and TRL's ``SFTTrainer``) or PyTorch FSDP2 (``fully_shard`` in a plain torch
loop under ``torch.distributed.run``), or the same in one unsharded process as the reference.

``python tests/_sharded_worker.py SETUP OUT JOBS_JSON``: SETUP is ``trainer`` or ``fsdp2``; JOBS_JSON is a list of
jobs run one after the other in this process. Each job writes what this rank saw to ``OUT/<name>/rank{N}.json`` (and
rank 0 the final weights, and under ``fsdp2`` the first step's gradients, to ``OUT/<name>/weights.safetensors``), so
the test compares ranks with each other and with the single-process run. A job's keys:

* both: ``name``, ``methods`` (empty: no anchor at all), ``method_weights``, ``weight``, ``axis`` (a bundle
  directory, or None for the on-the-fly axis), ``steps``, ``lr``, ``lora``;
* ``trainer``: ``optim``, ``save_steps``, ``resume`` (a checkpoint), ``probe_every``, ``probe_file``, ``report_to``;
* ``fsdp2`` (plain SGD): ``probes`` with ``probe_file`` (a probe step after training), ``eos_bias`` (end sampled
  answers early, at lengths that differ between ranks).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script by a launcher
    sys.path.insert(0, str(ROOT))

from anchor.axis import AssistantAxis  # noqa: E402
from anchor.callback import AnchorCallback, AnchorConfig  # noqa: E402
from tests import tokenizers_util  # noqa: E402
from tests.conftest import make_tiny_model  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
GLOBAL_BATCH = 4  # rows per optimizer step, split over the ranks


def tokenizer() -> Any:
    tok = tokenizers_util.chatml()
    tok.pad_token = tok.eos_token
    return tok


def conversations(n: int = 16) -> list[dict]:
    """Rows of different lengths, so sequence means and token masks matter."""
    return [{"messages": [{"role": "user", "content": f"Is Paris the capital of France? {i}"},
                          {"role": "assistant", "content": "Yes, Paris is the capital. " * (1 + i % 3)}]}
            for i in range(n)]


def anchor_config(job: dict) -> AnchorConfig:
    """The job's anchor: small settings so the on-the-fly axis, probes and replay pools take seconds."""
    probes = job.get("probe_file")
    return AnchorConfig(
        axis=job.get("axis"), layers=[1, 2], method=job["methods"], method_weights=job.get("method_weights"),
        weight=job.get("weight", 1.0), floor_percentile=90, probe_every=job.get("probe_every", 0),
        probe_max_new_tokens=4, probe_file=probes, axis_n_roles=2, axis_n_questions=2, axis_max_new_tokens=4,
        replay_batch_size=2, replay_max_new_tokens=4, lm_replay_pool=4, steer_coefficient=0.05,
    )


def write(out: Path, name: str, seen: dict, weights: dict[str, torch.Tensor] | None) -> None:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{RANK}.json").write_text(json.dumps(seen))
    if weights is not None and RANK == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "weights.safetensors"))


def state_digest(callback: AnchorCallback) -> dict:
    """What the anchor holds now (axis, τ, layers, each method's tensors), in a JSON-comparable form."""
    tensors, meta = callback.anchor.state_dict()
    return {"axis": callback.axis.axis.tolist(), "tau": {str(k): v for k, v in callback.anchor.tau.items()},
            "layers": callback.anchor.layers, "methods": meta,
            "tensors": {k: v.double().flatten().tolist() for k, v in sorted(tensors.items())}}


# -- DeepSpeed ZeRO through accelerate and SFTTrainer ------------------------------------------------------------


def gathered_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full on every rank (ZeRO-3 partitions them; ZeRO-2 and one process hold them whole)."""
    params = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


class Recorder(TrainerCallback):
    """Reads the anchor's restored state as training begins (after the anchor's own ``on_train_begin``)."""

    def __init__(self, callback: AnchorCallback):
        self.callback, self.begin = callback, None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begin = state_digest(self.callback) if self.callback.anchor is not None else None


def trainer_job(out: Path, job: dict) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from anchor.models import unwrap

    tok = tokenizer()
    callback = AnchorCallback(anchor_config(job)) if job.get("methods") else None
    recorder = Recorder(callback) if callback else None
    run_dir = out / job["name"] / "run"
    args = SFTConfig(
        output_dir=str(run_dir), max_steps=job["steps"], per_device_train_batch_size=GLOBAL_BATCH // WORLD,
        learning_rate=job.get("lr", 1e-3), optim=job.get("optim", "adamw_torch"), max_grad_norm=0.0,
        lr_scheduler_type="constant", logging_steps=1, report_to=job.get("report_to", "none"), use_cpu=True,
        save_strategy="steps" if job.get("save_steps") else "no", save_steps=job.get("save_steps") or 500,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=False, train_sampling_strategy="sequential",
    )
    model = make_tiny_model(tok)
    if job.get("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    callbacks = [c for c in (callback, recorder) if c is not None]
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(conversations()),
                         processing_class=tok, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=job.get("resume"))
    plugin = trainer.accelerator.state.deepspeed_plugin
    seen: dict[str, Any] = {
        "world_size": args.world_size, "distributed_type": str(trainer.accelerator.distributed_type),
        "zero_stage": plugin.zero_stage if plugin is not None else None,
        "sharded": any(hasattr(p, "ds_id") for p in trainer.model.parameters()),
        "log_history": trainer.state.log_history,
    }
    if callback is not None:
        seen.update(begin=recorder.begin, end=state_digest(callback))
        if callback.probes is not None:  # every rank measures again, in lockstep: each rank's own numbers
            seen["probe_rerun"] = callback.probes.measure(unwrap(callback.anchor.model))
    write(out, job["name"], seen, gathered_weights(trainer.model))
    del trainer
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # the next job builds its own accelerator


# -- PyTorch FSDP2 (fully_shard) in a plain torch loop -----------------------------------------------------------


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 as accelerate's TRANSFORMER_BASED_WRAP does it: one unit per decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    from anchor.models import decoder_layers, unwrap

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(unwrap(model))
    return model


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def rows(step: int) -> dict[str, torch.Tensor]:
    """This rank's share of step ``step``'s global batch: equal-length rows, every token trained, so the token-mean
    LM loss averaged over ranks equals the one process's mean over the whole batch."""
    ids = torch.randint(3, 300, (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(100 + step))
    ids = ids[RANK * GLOBAL_BATCH // WORLD:(RANK + 1) * GLOBAL_BATCH // WORLD]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def summed(metrics: dict[str, list[float]]) -> dict[str, list[float]]:
    """``{name: [sum, count]}`` summed over the ranks, as a plain loop reduces ``Anchor.pop_metrics``."""
    if WORLD == 1:
        return metrics
    parts: list[dict[str, list[float]]] = [{} for _ in range(WORLD)]
    dist.all_gather_object(parts, metrics)
    return {k: [sum(p[k][0] for p in parts), sum(p[k][1] for p in parts)] for k in metrics}


def fsdp_job(out: Path, job: dict) -> None:
    from anchor import compute_axis
    from anchor.engine import Anchor
    from anchor.methods import RunContext
    from anchor.probes import ProbeMonitor
    from anchor.reference import Reference

    tok = tokenizer()
    model = make_tiny_model(tok)
    if job.get("eos_bias"):  # sampled answers end early, at lengths that differ between ranks
        with torch.no_grad():
            model.lm_head.weight[tok.eos_token_id] += job["eos_bias"] * model.model.norm.weight.sign()
    if job.get("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    if WORLD > 1:
        shard(model)
    seen: dict[str, Any] = {"sharded": any(hasattr(p, "full_tensor") for p in model.parameters())}
    if job.get("axis") is None:  # on the fly, on the sharded model: every rank runs the extraction in lockstep
        axis = compute_axis(model, tok, n_roles=2, n_questions=2, max_new_tokens=4, progress=False)
    else:
        axis = AssistantAxis.from_pretrained(job["axis"])
    seen["axis"] = axis.axis.tolist()
    methods = job.get("methods") or []
    needs_reference = any(m in ("match", "replay", "kl") for m in methods)
    try:
        reference = Reference(model) if needs_reference else None
    except ValueError as err:  # a frozen copy of a sharded model, refused with the fix
        write(out, job["name"], {**seen, "error": str(err)}, None)
        return
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=job.get("lr", 0.1))
    engine = None  # no methods: no anchor at all, the baseline a λ = 0 run must equal bit for bit
    if methods:
        engine = Anchor(model, axis, anchor_config(job), reference=reference)
        engine.setup(RunContext(model=model, tokenizer=tok, seed=0, process_index=RANK))
    losses, grads, metrics, lengths = [], {}, [], []
    model.train()
    for step in range(job["steps"]):
        if engine is not None:
            engine.start_step(step)
            batch = getattr(engine.methods[0], "batch", None)
            if getattr(batch, "answer_mask", None) is not None:
                lengths.append(batch.answer_mask.sum(dim=1).tolist())
        loss = model(**rows(step)).loss
        loss.backward()
        losses.append(float(loss))
        if step == 0:
            grads = {n: full(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        if engine is not None:
            engine.check_finite(step)
            metrics.append({k: [float(s), float(c)] for k, (s, c) in engine.pop_metrics().items()})
    seen.update(losses=losses, metrics=[summed(m) for m in metrics], answer_lengths=lengths)
    if job.get("probes"):
        monitor = ProbeMonitor(axis, tok, "generated", 4, 16)
        with torch.no_grad():
            monitor.start(model, job["probe_file"])
            seen["probe"] = monitor.measure(model)
    if engine is not None:
        engine.detach()
    weights = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    write(out, job["name"], seen, {**weights, **{f"grad.{n}": g for n, g in grads.items()}})


def main(setup: str, out: Path, jobs: list[dict]) -> None:
    torch.set_num_threads(1)
    if setup == "fsdp2" and WORLD > 1:
        dist.init_process_group("gloo")
    run = {"trainer": trainer_job, "fsdp2": fsdp_job}[setup]
    for job in jobs:
        run(out, job)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]))
