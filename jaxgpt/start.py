"""Where a run's starting state comes from: fresh weights (init_from=scratch), pretrained ones (hf:, nanogpt:,
openai:, ckpt: or a workdir), or the checkpoint resume.plan chose, restored onto this run's mesh."""
from __future__ import annotations

import functools

import jax
from flax import nnx
from ml_collections import ConfigDict

from jaxgpt import checkpoint, cli, loader, model, resume, tokenizer
from jaxgpt.errors import UserFileNotFoundError, UserValueError
from jaxgpt.step import Steps, TrainState, fresh_state


class Pretrained:
    """The weights init_from names, loaded once: the model config comes from them, then the starting state."""

    def __init__(self, config: ConfigDict, tok: tokenizer.Tokenizer, data_dir: str):
        self.config, self.tokenizer, self.data_dir = config, tok, data_dir

    @functools.cached_property
    def model(self) -> model.GPT:
        spec, tok = self.config.init_from, self.tokenizer
        pretrained = loader.load(spec, **loader.compute_overrides(self.config.model))
        n = pretrained.config.n_valid_vocab
        gpt2_weights = n >= tokenizer.GPT2_VOCAB_SIZE
        if (tok.name == "gpt2") != gpt2_weights or (tok.name != "gpt2" and n != tok.vocab_size):
            raise UserValueError(
                f"init_from={spec!r} has {'GPT-2 BPE weights' if gpt2_weights else f'{n} tokens'} "
                f"but data.dir={self.data_dir}'s tokenizer is {tok.name} with {tok.vocab_size} tokens: the token ids "
                "mean different things; prepare the data with the weights' tokenizer (--tokenizer=gpt2)")
        return loader.crop_block_size(pretrained, self.config.model.block_size)  # nanoGPT's crop_block_size


def fresh(config: ConfigDict, workdir: str, steps: Steps, model_config: model.GPTConfig,
          pretrained: Pretrained) -> TrainState:
    """Step 0's state per init_from: drawn (scratch) or the pretrained weights, with fresh LoRA adapters."""
    if config.init_from == "resume":
        raise UserFileNotFoundError(f"init_from='resume' but {workdir} has no checkpoint to resume from")
    if config.init_from == "scratch":
        params = None  # drawn inside fresh_state's one jitted call
    elif loader.is_weights_spec(config.init_from):
        params = nnx.state(pretrained.model, nnx.Param)
        if model_config.lora_rank:  # fresh adapters beside the pretrained weights
            params = model.with_weights(model.build(model_config, config.seed), params)
        params = jax.device_put(params, steps.state_sharding.params)
    else:
        raise UserValueError(f"init_from={config.init_from!r}: expected scratch, resume, hf:DIR, "
                             "nanogpt:FILE, openai:DIR or ckpt:DIR")
    return fresh_state(steps, model_config, config.seed, params)


def resumed(start: resume.Resume, manager, workdir: str, steps: Steps, layout: dict) -> TrainState:
    """The state of checkpoint `start.step`, restored onto this run's mesh; the later steps (resume_step) moved
    aside once it has read. Says where it resumed, and what changed (`layout`: this run's, resume.layout)."""
    is_main = jax.process_index() == 0

    def read(step):
        return checkpoint.restore_training(manager, step, params=steps.abstract_state.params,
                                           train=steps.abstract_state.train_items())
    params, items = resume.readable_or_advice(manager, start.step, read)
    if start.later_steps:
        if is_main:
            where = checkpoint.set_aside(manager, start.later_steps)
            cli.log(is_main, f"resume_step={start.step}: moved the later checkpoints {list(start.later_steps)} to "
                             f"{where}")
        sync_processes("set_aside")
        manager.reload()
    cli.log(is_main, f"resumed from {workdir} at step {start.step}{resume.changed(start.written_by, layout)}")
    return TrainState(params=params, **items)


def sync_processes(name: str):
    """Every process waits here until all have arrived (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
