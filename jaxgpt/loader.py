"""Where a model comes from: a training config (its shape, fresh weights) or saved weights, through one loader.

Weights specs: hf:DIR (a Hugging Face GPT-2 or Llama directory), nanogpt:FILE (a nanoGPT ckpt.pt), openai:DIR (a
model of OpenAI's GPT-2 release: hparams.json and its TensorFlow checkpoint, read without TensorFlow), ckpt:DIR or
a bare DIR (a jaxgpt model directory or a training workdir, whose step is latest, best or a number). Every loader
takes the compute-only overrides of model.COMPUTE_FIELDS.
"""
from __future__ import annotations

import dataclasses
import math

from flax import nnx
from ml_collections import ConfigDict

from jaxgpt import checkpoint, model
from jaxgpt.errors import UserRuntimeError, UserValueError

SPECS = {"hf": "hf:DIR", "nanogpt": "nanogpt:FILE", "openai": "openai:DIR", "ckpt": "ckpt:DIR"}  # kind -> form
KINDS = tuple(SPECS)
# GPTConfig fields a training config's model section sets as they are
ARCHITECTURE_FIELDS = ("bias", "activation", "norm", "mlp", "mlp_hidden", "positions", "rope_theta", "n_kv_head",
                       "tie_embeddings", "layer_norm_epsilon", "qk_norm", "logit_softcap", "zero_init_proj",
                       "value_embeds")


def model_config(config: ConfigDict, vocab_size: int) -> model.GPTConfig:
    """The GPTConfig of a training config; vocab_size is the tokenizer's (padded here to a multiple of 64)."""
    m = config.model
    if m.preset and m.preset not in model.PRESETS:
        raise UserValueError(f"model.preset={m.preset!r}: expected one of {sorted(model.PRESETS)} or ''")
    shape = model.PRESETS[m.preset] if m.preset else dict(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd)
    rows = m.vocab_size or 64 * math.ceil(vocab_size / 64)
    if rows < vocab_size:
        raise UserValueError(f"model.vocab_size={rows} is smaller than the tokenizer's vocabulary ({vocab_size})")
    return model.GPTConfig(vocab_size=rows, valid_vocab_size=vocab_size, block_size=m.block_size,
                           **{name: m[name] for name in ARCHITECTURE_FIELDS}, **shape, **compute_overrides(m),
                           **lora_fields(config))


def lora_fields(config: ConfigDict) -> dict:
    """The GPTConfig fields of a training config's lora section."""
    lora = config.lora
    return dict(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                lora_targets=tuple(t.strip() for t in lora.targets.split(",") if t.strip()))


def compute_overrides(model_section: ConfigDict) -> dict:
    """The compute-only fields of a training config's model section."""
    return {name: model_section[name] for name in model.COMPUTE_FIELDS}


def is_weights_spec(spec: str) -> bool:
    return spec.partition(":")[0] in KINDS


def load(spec: str, step: str | int | None = None, **overrides) -> model.GPT:
    """The model that a weights spec names (see the module docstring); overrides set compute-only fields."""
    kind, _, path = spec.partition(":")
    if kind not in KINDS:
        kind, path = "ckpt", spec
    if not path:
        raise UserValueError(f"{spec!r}: expected {', '.join(SPECS.values())} or a directory")
    if unknown := sorted(set(overrides) - set(model.COMPUTE_FIELDS)):
        raise UserValueError(f"loading {spec!r}: {unknown} are not compute-only fields {list(model.COMPUTE_FIELDS)}")
    if kind == "ckpt":
        return checkpoint.load_model(path, step, **overrides)
    if step not in (None, "latest"):
        raise UserValueError(f"step={step!r}: {spec!r} holds one set of weights; steps belong to training workdirs")
    try:
        import torch_bridge
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise UserRuntimeError(f"loading {spec!r} goes through torch_bridge, which needs PyTorch: "
                               "pip install -e '.[torch]'") from None
    importers = {"hf": torch_bridge.from_hf, "nanogpt": torch_bridge.from_nanogpt, "openai": torch_bridge.from_openai}
    return importers[kind](path, **overrides)


def crop_block_size(m: model.GPT, block_size: int) -> model.GPT:
    """The model for sequences up to block_size < its own, as nanoGPT's crop_block_size: wpe keeps its first rows."""
    if block_size >= m.config.block_size:
        return m
    state = nnx.state(m, nnx.Param).to_pure_dict()
    if "wpe" in state:
        state["wpe"]["embedding"] = state["wpe"]["embedding"][:block_size]
    graphdef, target = nnx.split(model.abstract(dataclasses.replace(m.config, block_size=block_size)))
    target.replace_by_pure_dict(state)
    return nnx.merge(graphdef, target)
