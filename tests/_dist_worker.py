"""One rank of the 2-process CPU test (run by ``torch.distributed.run`` from ``tests/test_callback_dist.py``).

Trains the tiny model with SFTTrainer over gloo with the methods named in argv[2] (comma-separated, composed), with
the axis computed on the fly (so both ranks must compute it in lockstep and agree), and writes what this rank saw
to ``OUT/rank{N}.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from anchor.callback import AnchorCallback, AnchorConfig
from tests import tokenizers_util
from tests.conftest import make_tiny_model


def main(out: Path, methods: list[str]) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    tokenizer = tokenizers_util.chatml()
    tokenizer.pad_token = tokenizer.eos_token
    rows = [{"messages": [{"role": "user", "content": f"Is Paris the capital of France? {i}"},
                          {"role": "assistant", "content": "Yes, Paris is the capital. " * (1 + i % 4)}]}
            for i in range(16)]
    probes = out / "probes.json"
    config = AnchorConfig(layers=[1, 2], method=methods, weight=1.0, floor_percentile=90, probe_every=2,
                          probe_max_new_tokens=4, probe_file=str(probes), axis_n_roles=2, axis_n_questions=2,
                          axis_max_new_tokens=4, replay_batch_size=2, replay_max_new_tokens=4, lm_replay_pool=4)
    callback = AnchorCallback(config)
    args = SFTConfig(
        output_dir=str(out / "run"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        report_to=["tensorboard"], use_cpu=True, ddp_backend="gloo", save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True, seed=0, bf16=False, gradient_checkpointing=False,
    )
    trainer = SFTTrainer(model=make_tiny_model(tokenizer), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    seen = {
        "world_size": args.world_size,
        "axis": callback.axis.axis.tolist(),
        "tau": {str(k): v for k, v in callback.anchor.tau.items()},
        "log_history": trainer.state.log_history,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
