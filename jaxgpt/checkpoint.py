"""Model checkpoints on disk: a directory with config.json and an orbax tree of parameters.

`save_model`/`load_model` are the exchange format between torch_bridge, the trainer (init_from) and the
sampler. Training checkpoints (optimizer state, data iterator, ...) live in jaxgpt/train.py's manager and
are read here too, so every consumer takes either kind of directory.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxgpt.model import GPT, GPTConfig, build

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_model(model: GPT, directory: str) -> str:
    """Writes DIR/config.json and DIR/params (orbax). Returns the absolute directory."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(model.config), f, indent=2)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    return directory


def read_config(directory: str) -> GPTConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a jaxgpt model directory: {CONFIG_FILE} is missing")
    with open(path) as f:
        fields = json.load(f)
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    if unknown := sorted(set(fields) - known):
        raise ValueError(f"{path}: unknown GPTConfig fields {unknown}")
    return GPTConfig(**fields)


def load_model(directory: str, **overrides) -> GPT:
    """Loads a model saved by `save_model`. `overrides` change compute-only fields (dtype, scan_layers, ...)."""
    directory = os.path.abspath(directory)
    config = dataclasses.replace(read_config(directory), **overrides)
    model = build(config)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nnx.state(model, nnx.Param).to_pure_dict())
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(directory, PARAMS_DIR), target)
    nnx.update(model, params)
    return model
