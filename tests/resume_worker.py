"""`python -m jaxgpt.train` as a user launches it (the same flags), also recording the token rows this process feeds
into every step: with RECORD_TO=PATH set, each process appends {"step", "process", "rows"} lines to PATH.PROCESS.jsonl.
A test hook kept in tests/, out of the trainer: tests/test_resume.py compares the windows of resumed runs with them."""
import json
import os

import jax
from absl import flags

from jaxgpt import cli, train


def recording(trainer_class, path: str):
    initial_state, local_batches = trainer_class.initial_state, trainer_class.local_batches

    def start(self):
        state, step = initial_state(self)
        self.recorded_step = step
        return state, step

    def batches(self, n):
        out = local_batches(self, n)
        with open(f"{path}.{jax.process_index()}.jsonl", "a") as f:
            for i in range(n):
                self.recorded_step += 1
                rows = out["inputs"][i].reshape(-1, out["inputs"].shape[-1]).tolist()
                f.write(json.dumps({"step": self.recorded_step, "process": jax.process_index(), "rows": rows}) + "\n")
        return out

    trainer_class.initial_state, trainer_class.local_batches = start, batches


if __name__ == "__main__":
    if os.environ.get("RECORD_TO"):
        recording(train.Trainer, os.environ["RECORD_TO"])
    train.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(train.main)
