"""The anchor under sharding, on two CPU processes over gloo: DeepSpeed ZeRO-2/3 (``accelerate launch`` with
``configs/deepspeed_zero{2,3}.yaml`` and TRL's ``SFTTrainer``) and PyTorch FSDP2 (``fully_shard``, in a plain torch
loop under ``torch.distributed.run``; accelerate's FSDP plugin refuses CPUs, see ``configs/README.md``).

Each set-up is checked against one unsharded process: the anchored loss and gradient equal its own to fp32 precision,
the axis (given, or computed on the fly in lockstep) is the same on both ranks, metrics are reduced and logged once,
probe steps finish and agree between ranks, the anchor state survives checkpoint and resume, and λ = 0 trains
bit-identically to no anchor. Every launch has a timeout, so a rank waiting on a collective fails the test instead
of hanging the suite. The ranks run ``tests/_sharded_worker.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anchor.state import STATE_DIR, load_state
from tests.conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_sharded_worker.py"
LAUNCH_TIMEOUT = 240  # seconds; one launch takes 10-40 s on 2 cores, a hang takes forever

try:
    import deepspeed  # noqa: F401

    DEEPSPEED_MISSING = ""
except Exception as err:  # not installed, or installed without its CPU accelerator working
    DEEPSPEED_MISSING = (f"DeepSpeed cannot be imported here ({type(err).__name__}: {err}); install the optional extra "
                         "with DS_BUILD_OPS=0 pip install -e '.[deepspeed]'")

ALL_METHODS = ["floor", "match", "replay", "preventative", "lm_replay", "kl", "incremental", "ablate"]
FULL_FT_METHODS = ["floor", "preventative", "lm_replay", "incremental", "ablate"]  # no frozen copy: ZeRO-3 and FSDP
EQUAL = {"methods": ["floor", "preventative"], "method_weights": [20, 1], "steps": 1, "optim": "sgd", "lr": 1.0}

def _env(tmp_path: Path, cache: str = "cache") -> dict[str, str]:
    return {**os.environ, "ANCHOR_CACHE": str(tmp_path / cache), "TENSORBOARD_LOGGING_DIR": str(tmp_path / "tb"),
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false"}


def _run(command: list[str], env: dict[str, str]) -> None:
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-3000:]
        pytest.fail(f"{command[:6]}... did not finish in {LAUNCH_TIMEOUT} s (a rank waiting on a collective?): {tail}")
    assert done.returncode == 0, done.stderr[-5000:]


def deepspeed_launch(stage: int, out: Path, jobs: list[dict], port: int, env: dict[str, str]) -> None:
    """Two processes under the repository's own DeepSpeed config, in fp32 (bf16 is a GPU setting)."""
    _run(["accelerate", "launch", "--config_file", str(ROOT / "configs" / f"deepspeed_zero{stage}.yaml"),
          "--mixed_precision", "no", "--num_processes", "2", "--main_process_port", str(port),
          str(WORKER), "trainer", str(out), json.dumps(jobs)], env)


def fsdp_launch(out: Path, jobs: list[dict], port: int, env: dict[str, str]) -> None:
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
          str(WORKER), "fsdp2", str(out), json.dumps(jobs)], env)


def single(setup: str, out: Path, jobs: list[dict], env: dict[str, str]) -> None:
    _run([sys.executable, str(WORKER), setup, str(out), json.dumps(jobs)], env)


def ranks(out: Path, name: str, world: int = 2) -> list[dict]:
    return [json.loads((out / name / f"rank{r}.json").read_text()) for r in range(world)]


def weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / name / "weights.safetensors"))


def anchor_logs(seen: dict) -> list[dict]:
    return [{k: v for k, v in h.items() if k.startswith("anchor/") or k in ("step", "loss")}
            for h in seen["log_history"] if "anchor/proj/layer_1" in h]


def assert_logs_close(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    """Same steps, same metric names, values equal to fp32 precision."""
    assert [sorted(h) for h in a] == [sorted(h) for h in b]
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=rel, abs=1e-6), (x, y)


def sgd_gradient(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient of one plain SGD step with learning rate 1."""
    return {k: before[k] - after[k] for k in after if not k.startswith("grad.")}


def assert_close_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def axis_dir(tiny_axis, tmp_path_factory) -> str:
    """The tiny model's axis as a bundle on disk, given to runs that must not depend on the on-the-fly axis."""
    path = tmp_path_factory.mktemp("axis")
    tiny_axis.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def start_weights(tiny_tokenizer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in make_tiny_model(tiny_tokenizer).named_parameters()}


# -- DeepSpeed ZeRO ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(bool(DEEPSPEED_MISSING), reason=DEEPSPEED_MISSING)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_anchored_step_equals_one_process_and_weight_zero_is_bit_identical(tmp_path, stage, axis_dir,
                                                                                 start_weights):
    equal = {"name": "equal", **EQUAL, "axis": axis_dir}
    jobs = [equal, {"name": "plain", "methods": [], "steps": 2},
            {"name": "weight0", "methods": FULL_FT_METHODS, "weight": 0.0, "axis": axis_dir, "steps": 2}]
    if stage == 3:  # with LoRA every method runs, the ones that compare with the adapter-disabled base included
        jobs.append({"name": "lora", "lora": True, "methods": ALL_METHODS, "axis": axis_dir, "steps": 2})
    deepspeed_launch(stage, tmp_path / "zero", jobs, 29741 + stage, _env(tmp_path))
    single("trainer", tmp_path / "one", [equal, {**equal, "name": "unanchored", "methods": []}], _env(tmp_path))

    zero, one = ranks(tmp_path / "zero", "equal"), ranks(tmp_path / "one", "equal", world=1)[0]
    assert [r["distributed_type"] for r in zero] == ["DistributedType.DEEPSPEED"] * 2
    assert zero[0]["zero_stage"] == stage and zero[0]["world_size"] == 2
    assert zero[0]["sharded"] is (stage == 3)  # ZeRO-3 partitions the weights: the hooks read activations only
    assert one["distributed_type"] == "DistributedType.NO"

    # the step's loss and every anchor metric, reduced over the ranks, are the one process's
    logs = anchor_logs(zero[0])
    assert logs == anchor_logs(zero[1])
    assert_logs_close(logs, anchor_logs(one))
    # the gradient (one SGD step at learning rate 1, no clipping) is the one process's, anchor included
    grad = sgd_gradient(start_weights, weights(tmp_path / "zero", "equal"))
    expected = sgd_gradient(start_weights, weights(tmp_path / "one", "equal"))
    assert_close_dicts(grad, expected, atol=1e-5)
    unanchored = sgd_gradient(start_weights, weights(tmp_path / "one", "unanchored"))
    assert max_difference(expected, unanchored) > 1e-2  # the anchor's share of the gradient is far above tolerance

    # λ = 0: every method composed, every metric logged, and the weights bit for bit those of no anchor
    plain, weight0 = weights(tmp_path / "zero", "plain"), weights(tmp_path / "zero", "weight0")
    assert all(torch.equal(plain[k], weight0[k]) for k in plain)
    history = ranks(tmp_path / "zero", "weight0")[0]["log_history"]
    assert [h["loss"] for h in history if "loss" in h] == \
        [h["loss"] for h in ranks(tmp_path / "zero", "plain")[0]["log_history"] if "loss" in h]
    assert all(h["anchor/weight"] == 0 and "anchor/proj/layer_2" in h for h in history if "loss" in h)

    if stage == 3:
        lora = ranks(tmp_path / "zero", "lora")
        assert lora[0]["sharded"] and anchor_logs(lora[0]) == anchor_logs(lora[1])
        assert {"anchor/penalty", "anchor/replay_penalty", "anchor/lm_replay_loss", "anchor/kl"} <= \
            set(anchor_logs(lora[0])[-1])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(bool(DEEPSPEED_MISSING), reason=DEEPSPEED_MISSING)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_lockstep_axis_probes_logged_once_and_resume(tmp_path, stage):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    probes = [{"domain": d, "prompt": f"Tell me about {d}."} for d in ("coding", "writing", "emotional", "meta")]
    (tmp_path / "probes.json").write_text(json.dumps({"version": 1, "probes": probes}))
    full = {"name": "full", "methods": FULL_FT_METHODS, "axis": None, "steps": 4, "save_steps": 2, "probe_every": 2,
            "probe_file": str(tmp_path / "probes.json"), "report_to": "tensorboard"}
    out = tmp_path / "zero"
    deepspeed_launch(stage, out, [full], 29751 + stage, _env(tmp_path))
    checkpoint = out / "full" / "run" / "checkpoint-2"
    resumed = {**full, "name": "resumed", "resume": str(checkpoint), "report_to": "none"}
    deepspeed_launch(stage, out, [resumed], 29761 + stage, _env(tmp_path, cache="empty-cache"))

    seen = ranks(out, "full")
    assert seen[0]["zero_stage"] == stage and seen[0]["sharded"] is (stage == 3)
    # the on-the-fly axis: computed by both ranks in lockstep (ZeRO-3 needs both in every forward), one result
    assert seen[0]["begin"]["axis"] == seen[1]["begin"]["axis"] and seen[0]["begin"]["tau"] == seen[1]["begin"]["tau"]
    assert seen[0]["end"] == seen[1]["end"]
    # metrics reduced over the ranks: identical on both, at every step, probes at the probe steps
    logs = anchor_logs(seen[0])
    assert logs == anchor_logs(seen[1])
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    assert [h["step"] for h in logs if "anchor/probe_drift" in h] == [2, 4]
    # a probe step run again on each rank, in lockstep, gives each rank the same numbers
    assert seen[0]["probe_rerun"] == seen[1]["probe_rerun"] and "probe_drift/coding" in seen[0]["probe_rerun"]
    # logged once: the main process alone writes the event file
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = EventAccumulator(str(events[0]))
    scalars.Reload()
    assert [e.step for e in scalars.Scalars("train/anchor/penalty")] == [1, 2, 3, 4]
    assert [e.value for e in scalars.Scalars("train/anchor/penalty")] == pytest.approx(
        [h["anchor/penalty"] for h in logs])

    # resume: both ranks restore the checkpoint's anchor state (no axis recomputed: their cache is empty) ...
    saved = load_state(checkpoint / STATE_DIR)
    again = ranks(out, "resumed")
    for rank in again:
        assert rank["begin"]["axis"] == saved.axis.axis.tolist() == seen[0]["begin"]["axis"]
        assert rank["begin"]["tau"] == {str(k): v for k, v in saved.tau.items()}
        assert rank["begin"]["tensors"] == {k: v.double().flatten().tolist()
                                            for k, v in sorted(saved.method_tensors().items())}
    assert not (tmp_path / "empty-cache").exists()
    # ... and go on exactly as the uninterrupted run did
    assert_logs_close(anchor_logs(again[0])[-2:], logs[-2:])
    assert_close_dicts(weights(out, "resumed"), weights(out, "full"), atol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(bool(DEEPSPEED_MISSING), reason=DEEPSPEED_MISSING)
def test_recipes_train_under_the_deepspeed_configs(tmp_path, tiny_tokenizer):
    """``scripts/train.py`` as a user launches it: the data built in one process (configs/single_process.yaml), then
    recipes on 2 processes under each DeepSpeed config, given that data as it is (ZeRO-3 cannot check its model)."""
    from tests.test_recipes import _tiny_overrides

    model_dir = tmp_path / "tiny"
    make_tiny_model(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    env = _env(tmp_path)
    train = str(ROOT / "scripts" / "train.py")
    runs = {"single": ("single_process", "quickstart"), "zero2": ("deepspeed_zero2", "sft-lora"),
            "zero3": ("deepspeed_zero3", "sft-full")}
    for port, (name, (config, recipe)) in enumerate(runs.items(), start=29791):
        processes = "1" if name == "single" else "2"
        as_it_is = [] if name == "single" else ["--build_data", "false"]  # the single run built it
        _run(["accelerate", "launch", "--config_file", str(ROOT / "configs" / f"{config}.yaml"), "--mixed_precision",
              "no", "--num_processes", processes, "--main_process_port", str(port), train, "--config",
              str(ROOT / "recipes" / f"{recipe}.yaml"), *_tiny_overrides(tmp_path, model_dir, tmp_path / name),
              *as_it_is], env)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["anchor"]["layers"] == [1, 2], name
        assert set(summary["probe_drift"]) >= {"all", "coding", "writing", "emotional", "meta"}, name
        # the held-out drift evaluation runs where one process can run the model, and is skipped under ZeRO-3
        assert (summary["drift"] is None) is (name == "zero3"), name


# -- PyTorch FSDP2 -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_anchored_step_equals_one_process_probes_agree_and_weight_zero_is_bit_identical(tmp_path, axis_dir):
    probes = [{"domain": d, "prompt": f"Tell me about {d}."} for d in ("coding", "writing")]
    (tmp_path / "probes.json").write_text(json.dumps({"version": 1, "probes": probes}))
    equal = {"name": "equal", **EQUAL, "axis": axis_dir, "probes": True, "probe_file": str(tmp_path / "probes.json")}
    sampled = {"name": "sampled", "lora": True, "eos_bias": 3.0, "methods": ["replay", "match", "kl"],
               "axis": axis_dir, "steps": 3}
    jobs = [equal, {"name": "plain", "methods": [], "steps": 2, "axis": axis_dir},
            {"name": "weight0", "methods": FULL_FT_METHODS, "weight": 0.0, "axis": axis_dir, "steps": 2}, sampled,
            {"name": "copy", "methods": ["match"], "axis": axis_dir, "steps": 1}]
    fsdp_launch(tmp_path / "fsdp", jobs, 29771, _env(tmp_path))
    single("fsdp2", tmp_path / "one", [equal, {**equal, "name": "unanchored", "methods": [], "probes": False}],
           _env(tmp_path))

    fsdp, one = ranks(tmp_path / "fsdp", "equal"), ranks(tmp_path / "one", "equal", world=1)[0]
    assert fsdp[0]["sharded"] and not one["sharded"]
    # the loss (each rank's half of the batch, averaged) and the metrics reduced over ranks are the one process's
    assert (fsdp[0]["losses"][0] + fsdp[1]["losses"][0]) / 2 == pytest.approx(one["losses"][0], rel=1e-6)
    assert fsdp[0]["metrics"] == fsdp[1]["metrics"]
    for name, (total, count) in one["metrics"][0].items():
        reduced_total, reduced_count = fsdp[0]["metrics"][0][name]  # counts are tokens, rows or micro-batches
        assert reduced_total / reduced_count == pytest.approx(total / count, rel=1e-5, abs=1e-7), name
    # FSDP's reduce-scattered gradient, gathered, is the one process's, the anchor's terms included
    grads = {k: v for k, v in weights(tmp_path / "fsdp", "equal").items() if k.startswith("grad.")}
    expected = {k: v for k, v in weights(tmp_path / "one", "equal").items() if k.startswith("grad.")}
    assert_close_dicts(grads, expected, atol=1e-6)
    unanchored = {k: v for k, v in weights(tmp_path / "one", "unanchored").items() if k.startswith("grad.")}
    assert max_difference(expected, unanchored) > 1e-2
    # a probe step on the sharded model: it finishes, and both ranks read what the one process reads
    assert fsdp[0]["probe"] == fsdp[1]["probe"]
    assert fsdp[0]["probe"] == pytest.approx(one["probe"], rel=1e-4, abs=1e-5)

    plain, weight0 = weights(tmp_path / "fsdp", "plain"), weights(tmp_path / "fsdp", "weight0")
    assert all(torch.equal(plain[k], weight0[k]) for k in plain)
    assert ranks(tmp_path / "fsdp", "plain")[0]["losses"] == ranks(tmp_path / "fsdp", "weight0")[0]["losses"]

    # sampled answers end at different lengths on the two ranks, so their generate loops run different numbers of
    # forwards; generation keeps both ranks in every forward (torch marks fully_shard'ed modules, transformers syncs)
    lengths = [r["answer_lengths"] for r in ranks(tmp_path / "fsdp", "sampled")]
    assert lengths[0] != lengths[1]
    assert all(len(r["losses"]) == 3 for r in ranks(tmp_path / "fsdp", "sampled"))
    # full fine-tuning with a method that needs a frozen copy: refused with the fix, not torch's deepcopy assertion
    for rank in ranks(tmp_path / "fsdp", "copy"):
        assert "cannot be made of a sharded model (DeepSpeed ZeRO-3, FSDP). Train a PEFT adapter" in rank["error"]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_on_the_fly_axis_is_computed_in_lockstep(tmp_path, tiny_axis):
    fsdp_launch(tmp_path / "fsdp", [{"name": "fly", "methods": ["floor"], "axis": None, "steps": 1}], 29781,
                _env(tmp_path))
    seen = ranks(tmp_path / "fsdp", "fly")
    assert seen[0]["sharded"] and seen[0]["axis"] == seen[1]["axis"]


# -- the GPU check (scripts/gpu_check.sh): ready for a GPU machine with no network --------------------------------


def test_gpu_check_is_valid_bash_and_its_plan_carries_what_its_steps_use(tmp_path):
    script = ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        lint = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work")}
    plan = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # a dry run runs nothing

    steps = dict(re.findall(r"^step (\S+) +limit +\d+s: (.*)$", plan.stdout, flags=re.M))
    trained = [f"{c}-{r}" for c in ("zero2", "zero3", "fsdp") for r in ("full", "lora")]
    assert list(steps) == ["data", "sft-lora", "sft-full", *sorted(trained, key=lambda s: s.endswith("lora")),
                           "overhead-floor", "overhead-prev-lm", "capping", "drift"]
    for name in trained:  # each config runs each recipe, in bf16 on the GPU
        config = {"zero2": "deepspeed_zero2", "zero3": "deepspeed_zero3", "fsdp": "fsdp"}[name.split("-")[0]]
        command = steps[name]
        assert f"--config_file configs/{config}.yaml" in command and f"recipes/sft-{name.split('-')[1]}" in command
        assert "--use_cpu false --bf16 true" in command
    assert all("--config_file configs/single_process.yaml" in steps[f"sft-{r}"] for r in ("full", "lora"))
    assert "--device cuda --dtype bf16" in steps["overhead-floor"] and "--device cuda" in steps["capping"]
    # every file a step reads travels with the working tree: it is tracked by git (after "&&": results copied out)
    commands = "\n".join(c.split("&&")[0] for c in steps.values())
    named = set(re.findall(r"\b((?:configs|recipes|scripts)/[\w./-]+)", commands))
    assert {"configs/deepspeed_zero3.yaml", "scripts/results/reference_axis", "scripts/bench_drift.py"} <= named
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    for path in named:
        assert path in tracked or any(t.startswith(path.rstrip("/") + "/") for t in tracked), path
    # every dependency of the package is on the GPU image or carried (wandb only reports: the runs say none)
    image = re.search(r"^the machine must have: python3 with a CUDA torch and (.*)$", plan.stdout, re.M).group(1)
    carried = re.search(r"^carry \(wheels the image lacks\): (.*)$", plan.stdout, re.M).group(1)
    have = set(image.split()) | {w.split("==")[0] for w in carried.split()}
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {re.split(r"[<>=!~ ;\[]", d)[0].lower()
              for d in pyproject["dependencies"] + pyproject["optional-dependencies"]["deepspeed"]}
    assert needed - have == {"wandb"}
    assert all("--report_to none" in steps[s] for s in ("sft-lora", "sft-full", *trained))

    only = subprocess.run(["bash", str(script), "--dry-run", "--only", "capping,drift"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert re.findall(r"^step (\S+)", only.stdout, flags=re.M) == ["capping", "drift"]
    wrong = subprocess.run(["bash", str(script), "--only", "zero4-full"], capture_output=True, text=True, env=env,
                           timeout=60)
    assert wrong.returncode == 2 and "unknown step zero4-full; steps: data sft-lora" in wrong.stderr
