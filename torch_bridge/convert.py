"""The one conversion engine: expand the table for a config, check every key and shape, transform, build or read.

Import: torch state dict -> {jaxgpt path: array} per layer -> stacked if scan_layers -> GPT; export runs backwards.
Nothing here knows a format beyond the `Format` settings in mapping.py.
"""
from __future__ import annotations

import dataclasses
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxgpt.errors import UserValueError
from jaxgpt.model import GPT, PRESETS, GPTConfig, abstract
from torch_bridge import mapping as m

EMBEDDING_KEY, POSITION_KEY = m.MODULE_PREFIX + "wte.weight", m.MODULE_PREFIX + "wpe.weight"


def rows(config: GPTConfig, fmt: m.Format) -> list[tuple[tuple, str, bool]]:
    """The table expanded for config.n_layer: (jaxgpt path tuple, torch key, transpose)."""
    out = []
    for path, key, linear in m.TABLE:
        if path.endswith(".bias") and not config.bias:
            continue
        for i in range(config.n_layer) if "{i}" in path else [None]:
            parts = tuple(int(p) if p.isdigit() else p for p in path.format(i=i).split("."))
            out.append((parts, key.format(i=i), linear and fmt.transpose_linear))
    return out


def vocab_rows(config: GPTConfig, fmt: m.Format) -> int:
    return config.vocab_size if fmt.keeps_padded_vocab else config.n_valid_vocab


def export_config(config: GPTConfig, fmt: m.Format) -> dict:
    """The format's config entries for a jaxgpt config (the inverse of make_config)."""
    out = {**{theirs: getattr(config, ours) for ours, theirs in fmt.config_fields.items()},
           "vocab_size": vocab_rows(config, fmt)}
    if fmt.activation_field:
        out[fmt.activation_field] = next(k for k, v in fmt.activations.items() if v == config.activation)
    return out


def activation(fmt: m.Format, their_config: dict | None, source: str) -> str:
    """GPTConfig.activation for a checkpoint: its config's entry, else (no config, or none in the format) the
    format's own."""
    name = (their_config or {}).get(fmt.activation_field, next(iter(fmt.activations)))
    if name not in fmt.activations:
        raise UserValueError(f"{source}: {fmt.activation_field}={name!r} is an activation jaxgpt does not "
                             f"implement (expected one of {list(fmt.activations)})")
    return fmt.activations[name]


def canonical_keys(state_dict) -> dict:
    """Strips torch.compile's prefix and restores the 'transformer.' prefix that GPT2Model files lack."""
    def canonical(key):
        key = key.removeprefix(m.COMPILED_PREFIX)
        return key if key.startswith(m.MODULE_PREFIX) or key == m.TIED_HEAD else m.MODULE_PREFIX + key
    return {canonical(key): value for key, value in state_dict.items()}


def make_config(fmt: m.Format, their_config: dict | None, state_dict, source: str, n_head: int | None,
                overrides: dict) -> GPTConfig:
    """GPTConfig from the format's config (or, when there is none, the state dict's shapes); overrides win."""
    if their_config is None:
        fields, n_vocab = infer_fields(state_dict, n_head)
    else:
        if missing := [k for k in [*fmt.config_fields.values(), "vocab_size"] if k not in their_config]:
            raise UserValueError(f"{source}: its model config lacks {missing}")
        if wrong := {k: their_config[k] for k, ok in fmt.requires.items() if their_config.get(k, ok[0]) not in ok}:
            raise UserValueError(f"{source}: a GPT-2 variant jaxgpt does not implement: {wrong}")
        fields = {ours: their_config[theirs] for ours, theirs in fmt.config_fields.items()}
        n_vocab = their_config["vocab_size"]

    def padded(n):
        return -(-n // m.VOCAB_MULTIPLE) * m.VOCAB_MULTIPLE
    if fmt.keeps_padded_vocab:  # nanoGPT's 50304 is GPT-2's 50257 padded; another size is taken as unpadded
        vocab = dict(vocab_size=n_vocab, valid_vocab_size=m.GPT2_VOCAB if n_vocab == padded(m.GPT2_VOCAB) else None)
    else:  # padded for fast matmuls; the extra rows get -inf logits
        vocab = dict(vocab_size=padded(n_vocab), valid_vocab_size=n_vocab)
    return GPTConfig(**{**fields, **vocab, "activation": activation(fmt, their_config, source), **overrides})


def infer_fields(state_dict, n_head: int | None) -> tuple[dict, int]:
    """Model shape of a bare state dict: (GPTConfig fields, embedding rows). n_head defaults from the presets."""
    sd = canonical_keys(state_dict)
    if EMBEDDING_KEY not in sd or POSITION_KEY not in sd:
        raise UserValueError(f"cannot infer the model shape: the state dict lacks {EMBEDDING_KEY} or {POSITION_KEY}")
    (n_vocab, n_embd), block_size = sd[EMBEDDING_KEY].shape, sd[POSITION_KEY].shape[0]
    layers = {int(match[1]) for key in sd if (match := re.match(rf"{m.MODULE_PREFIX}h\.(\d+)\.", key))}
    n_head = n_head or next((p["n_head"] for p in PRESETS.values() if p["n_embd"] == n_embd), None)
    if n_head is None:
        raise UserValueError(f"n_embd={n_embd} matches no GPT-2 preset, so n_head cannot be inferred: pass n_head")
    return dict(n_layer=max(layers, default=-1) + 1, n_head=n_head, n_embd=n_embd, block_size=block_size,
                bias=f"{m.MODULE_PREFIX}ln_f.bias" in sd), n_vocab


def load_pickle(path) -> dict:
    """torch.load that executes no code: anything beyond tensors and plain containers is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserValueError(f"{path}: refusing to load this pickle: it carries code or objects other than tensors "
                             f"and plain containers, and torch_bridge never executes code from a checkpoint") from e


def load(state_dict, config: GPTConfig, fmt: m.Format, source: str) -> GPT:
    """A GPT holding `state_dict`'s weights. Every key and shape is checked; all problems raise one ValueError."""
    sd = canonical_keys(state_dict)
    for key in [t.format(i=i) for t in fmt.buffers for i in range(config.n_layer)]:
        sd.pop(key, None)
    head, problems = sd.pop(m.TIED_HEAD, None), []
    if head is not None and EMBEDDING_KEY in sd and not torch.equal(head, sd[EMBEDDING_KEY]):
        problems.append(f"untied head: {m.TIED_HEAD} differs from {EMBEDDING_KEY} (jaxgpt ties them)")
    per_layer = abstract(dataclasses.replace(config, scan_layers=False))
    shapes = {p: x.shape for p, x in flatten_dict(nnx.state(per_layer, nnx.Param).to_pure_dict()).items()}
    params, missing, misshaped = {}, [], []
    for path, key, transpose in rows(config, fmt):
        shape = (vocab_rows(config, fmt), *shapes[path][1:]) if key == EMBEDDING_KEY else shapes[path]
        want = tuple(reversed(shape)) if transpose else tuple(shape)
        if key not in sd:
            missing.append(key)
        elif tuple((tensor := sd.pop(key)).shape) != want:
            misshaped.append(f"{key}: got {tuple(tensor.shape)}, expected {want}")
        else:
            array = tensor.detach().cpu().to(torch.float32).numpy().copy()  # else jax on CPU may alias torch's memory
            if key == EMBEDDING_KEY:  # zero rows for the padded vocabulary: (vocab_size, n_embd)
                array = np.pad(array, [(0, config.vocab_size - array.shape[0]), (0, 0)])
            params[path] = array.T if transpose else array
    problems += [f"missing keys: {missing}"] * bool(missing) + [f"unexpected keys: {sorted(sd)}"] * bool(sd)
    if problems or misshaped:
        arch = f"n_layer={config.n_layer}, n_embd={config.n_embd}, bias={config.bias}"
        problems += [f"wrong shapes: {misshaped}"] * bool(misshaped)
        raise UserValueError(f"{source} does not match a {fmt.name} GPT-2 with {arch}:\n  " + "\n  ".join(problems))
    tree = unflatten_dict(params)
    if config.scan_layers:  # per-layer trees -> one tree with a leading (n_layer,) axis
        tree["h"] = jax.tree.map(lambda *layers: np.stack(layers), *(tree["h"][i] for i in range(config.n_layer)))
    graphdef, state = nnx.split(abstract(config))
    state.replace_by_pure_dict(jax.tree.map(lambda x: jnp.asarray(x, config.param_dtype), tree))
    return nnx.merge(graphdef, state)


def state_dict(model: GPT, fmt: m.Format) -> dict[str, torch.Tensor]:
    """The model's weights as float32 tensors under the format's keys, the tied head included."""
    config = model.config
    tree = jax.tree.map(lambda x: np.array(x, dtype=np.float32), nnx.state(model, nnx.Param).to_pure_dict())
    if config.scan_layers:  # (n_layer, ...) stacked tree -> one tree per layer
        tree["h"] = {i: jax.tree.map(lambda x, i=i: x[i], tree["h"]) for i in range(config.n_layer)}
    flat, out = flatten_dict(tree), {}
    for path, key, transpose in rows(config, fmt):
        array = flat[path][:vocab_rows(config, fmt)] if key == EMBEDDING_KEY else flat[path]
        out[key] = torch.from_numpy(np.ascontiguousarray(array.T if transpose else array))
    out[m.TIED_HEAD] = out[EMBEDDING_KEY]
    return out
