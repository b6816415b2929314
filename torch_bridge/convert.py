"""The one conversion engine: expand a table for a config, check every key and shape, reshape, build or read.

Import: torch state dict -> {jaxgpt path: array} per layer -> stacked if scan_layers -> GPT; export runs backwards.
Nothing here knows a format beyond the `Format` settings and tables in mapping.py.
"""
from __future__ import annotations

import dataclasses
import math
import pickle
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxgpt.errors import UserValueError
from jaxgpt.model import GPT, PRESETS, GPTConfig, abstract
from torch_bridge import mapping as m

VOCAB_PATHS = {tuple(p.split(".")) for p in m.VOCAB_PARAMS}
RESOLVED = {"mlp_hidden": "mlp_dim"}  # fields whose 0 means "derived": the resolved value is exported
_ABSENT = object()


def key_of(fmt: m.Format, path: str) -> str:
    """The format's torch key for a jaxgpt path (no block index)."""
    return next(key for p, key, _ in fmt.table if p == path)


def param_shapes(config: GPTConfig) -> dict[tuple, tuple]:
    """{jaxgpt path tuple: shape} of the model's parameters, per layer (as scan_layers=False stores them)."""
    per_layer = abstract(dataclasses.replace(config, scan_layers=False))
    return {p: x.shape for p, x in flatten_dict(nnx.state(per_layer, nnx.Param).to_pure_dict()).items()}


def rows(config: GPTConfig, fmt: m.Format, shapes: dict) -> list[tuple[tuple, str, object]]:
    """The table expanded for config.n_layer, limited to the parameters the model has: (path tuple, key, how)."""
    out = []
    for path, key, how in fmt.table:
        for i in range(config.n_layer) if "{i}" in path else [None]:
            parts = tuple(int(p) if p.isdigit() else p for p in path.format(i=i).split("."))
            if parts in shapes:
                out.append((parts, key.format(i=i), how))
    if uncovered := sorted(".".join(map(str, p)) for p in shapes.keys() - {path for path, _, _ in out}):
        raise UserValueError(f"{fmt.name} has no keys for the model's parameters {uncovered}")
    return out


def in_out(shape, n_in: int) -> tuple[int, int]:
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def torch_shape(shape, how, fmt: m.Format) -> tuple:
    """The torch tensor's shape for a jaxgpt parameter's (see the tables' `how`)."""
    if how is None:
        return tuple(shape)
    if how == "flat":
        return (math.prod(shape),)
    io = in_out(shape, how)
    io = io[::-1] if fmt.transpose_linear else io
    return (1, *io) if fmt.conv1d_kernels else io


def vocab_rows(config: GPTConfig, fmt: m.Format) -> int:
    return config.vocab_size if fmt.keeps_padded_vocab else config.n_valid_vocab


def unsupported(config: GPTConfig, fmt: m.Format) -> list[str]:
    """What about a model the format cannot express, one entry per offending field (empty: it fits)."""
    out = [(k, f"{k}={getattr(config, k)!r} ({fmt.name} has {v!r})") for k, v in fmt.fixed.items()
           if getattr(config, k) != v]
    out += [(k, f"{k}={getattr(config, k)!r} ({fmt.name} needs > 0)") for k in fmt.positive if getattr(config, k) <= 0]
    return [f"{text}: {fmt.hints[k]}" if k in fmt.hints else text for k, text in out]


def check_expressible(config: GPTConfig, fmt: m.Format) -> None:
    if problems := unsupported(config, fmt):
        raise UserValueError(f"{fmt.name} cannot express this model: " + "; ".join(problems))


def entries(theirs) -> tuple[str, ...]:
    return theirs if isinstance(theirs, tuple) else (theirs,)


def get(config: Mapping, entry: str, default=_ABSENT):
    """A config entry; "a.b" is config["a"]["b"]."""
    for part in entry.split("."):
        if not isinstance(config, Mapping) or part not in config:
            return default
        config = config[part]
    return config


def put(config: dict, entry: str, value) -> None:
    *parents, last = entry.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


def export_config(config: GPTConfig, fmt: m.Format) -> dict:
    """The format's config entries for a jaxgpt config (the inverse of make_config)."""
    check_expressible(config, fmt)
    out = {}
    for ours, theirs in fmt.config_fields.items():
        for entry in entries(theirs):
            put(out, entry, getattr(config, RESOLVED.get(ours, ours)))
    for entry, accepted in fmt.requires.items():
        put(out, entry, accepted[0])
    if fmt.head_dim_field:
        out[fmt.head_dim_field] = config.head_dim
    if fmt.activation_field:
        out[fmt.activation_field] = next(k for k, v in fmt.activations.items() if v == config.activation)
    return {**out, fmt.vocab_field: vocab_rows(config, fmt)}


def activation(fmt: m.Format, their_config: dict | None, source: str) -> dict:
    """GPTConfig.activation for a checkpoint: its config's entry, else (no config, or none in the format) the
    format's own; {} for formats without a GELU."""
    if not fmt.activations:
        return {}
    name = (their_config or {}).get(fmt.activation_field, next(iter(fmt.activations)))
    if name not in fmt.activations:
        raise UserValueError(f"{source}: {fmt.activation_field}={name!r} is an activation jaxgpt does not "
                             f"implement (expected one of {list(fmt.activations)})")
    return {"activation": fmt.activations[name]}


def canonical_keys(state_dict, fmt: m.Format) -> dict:
    """Strips torch.compile's prefix and restores the module prefix that files of the bare module lack."""
    def canonical(key):
        key = key.removeprefix(m.COMPILED_PREFIX)
        return key if key.startswith(fmt.prefix) or key == m.HEAD else fmt.prefix + key
    return {canonical(key): value for key, value in state_dict.items()}


def make_config(fmt: m.Format, their_config: dict | None, state_dict, source: str, n_head: int | None,
                overrides: dict) -> GPTConfig:
    """GPTConfig from the format's config (or, when there is none, the state dict's shapes); overrides win."""
    if their_config is None:
        fields, n_vocab = infer_fields(state_dict, fmt, n_head)
    else:
        fields, n_vocab = read_config(fmt, their_config, source), their_config[fmt.vocab_field]

    def padded(n):
        return -(-n // m.VOCAB_MULTIPLE) * m.VOCAB_MULTIPLE
    if fmt.keeps_padded_vocab:  # nanoGPT's 50304 is GPT-2's 50257 padded; another size is taken as unpadded
        vocab = dict(vocab_size=n_vocab, valid_vocab_size=m.GPT2_VOCAB if n_vocab == padded(m.GPT2_VOCAB) else None)
    else:  # padded for fast matmuls; the extra rows get -inf logits
        vocab = dict(vocab_size=padded(n_vocab), valid_vocab_size=n_vocab)
    return GPTConfig(**{**fmt.fixed, **fields, **vocab, **activation(fmt, their_config, source), **overrides})


def read_config(fmt: m.Format, their_config: dict, source: str) -> dict:
    """GPTConfig fields from the format's config; a variant jaxgpt does not implement is refused, naming the entry."""
    wanted = [e for theirs in fmt.config_fields.values() for e in entries(theirs)] + [fmt.vocab_field]
    if missing := [e for e in wanted if get(their_config, e) is _ABSENT]:
        raise UserValueError(f"{source}: its model config lacks {missing}")
    if fmt.closed_config and (unknown := sorted(set(their_config) - set(wanted))):
        raise UserValueError(f"{source}: {unknown} are not {fmt.name} settings ({', '.join(wanted)}): a model of "
                             "another architecture")
    wrong = {e: v for e, accepted in fmt.requires.items() if (v := get(their_config, e, accepted[0])) not in accepted}
    if wrong:
        raise UserValueError(f"{source}: a {fmt.name} variant jaxgpt does not implement: " + ", ".join(
            f"{e}={v!r} (expected {' or '.join(map(repr, fmt.requires[e]))})" for e, v in wrong.items()))
    fields = {}
    for ours, theirs in fmt.config_fields.items():
        values = {e: get(their_config, e) for e in entries(theirs)}
        if len(set(values.values())) > 1:
            raise UserValueError(f"{source}: {', '.join(f'{e}={v!r}' for e, v in values.items())} differ, and "
                                 f"jaxgpt's {ours} covers them all")
        fields[ours] = next(iter(values.values()))
    head_dim = fields["n_embd"] // fields["n_head"]
    if fmt.head_dim_field and (theirs := their_config.get(fmt.head_dim_field)) not in (None, head_dim):
        raise UserValueError(f"{source}: {fmt.head_dim_field}={theirs}, but jaxgpt's head size is n_embd // n_head "
                             f"= {head_dim}")
    return fields


def infer_fields(state_dict, fmt: m.Format, n_head: int | None) -> tuple[dict, int]:
    """Model shape of a bare state dict: (GPTConfig fields, embedding rows). n_head defaults from the GPT-2 presets
    where the format allows."""
    sd = canonical_keys(state_dict, fmt)
    embedding = key_of(fmt, m.EMBEDDING)
    if missing := [k for k in [embedding, *(key for key, _ in fmt.shape_keys.values())] if k not in sd]:
        raise UserValueError(f"cannot infer the model shape: the state dict lacks {missing}")
    fields = {field: sd[key].shape[axis] for field, (key, axis) in fmt.shape_keys.items()}
    layer_prefix = next(key for _, key, _ in fmt.table if "{i}" in key).split("{i}")[0]
    layers = {int(match[1]) for key in sd if (match := re.match(rf"{re.escape(layer_prefix)}(\d+)\.", key))}
    n_embd = fields["n_embd"]
    if fmt.preset_heads:
        n_head = n_head or next((p["n_head"] for p in PRESETS.values() if p["n_embd"] == n_embd), None)
        if n_head is None:
            raise UserValueError(f"n_embd={n_embd} matches no GPT-2 preset, so n_head cannot be inferred: pass n_head")
    elif n_head is None:
        raise UserValueError(f"a bare {fmt.name} state dict does not tell n_head: pass n_head")
    if "n_kv_head" in fields:  # k_proj's rows are n_kv_head * head_dim
        fields["n_kv_head"] //= n_embd // n_head
    bias_key = next(key for path, key, _ in fmt.table if "{i}" in key and path.endswith(".bias")).format(i=0)
    fields.update(n_layer=max(layers, default=-1) + 1, n_head=n_head, bias=bias_key in sd)
    if "tie_embeddings" not in fmt.fixed:  # tied unless a head that differs is stored
        fields["tie_embeddings"] = m.HEAD not in sd or torch.equal(sd[m.HEAD], sd[embedding])
    return {**fmt.bare_defaults, **fields}, sd[embedding].shape[0]


def load_pickle(path) -> dict:
    """torch.load that executes no code: anything beyond tensors and plain containers is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserValueError(f"{path}: refusing to load this pickle: it carries code or objects other than tensors "
                             f"and plain containers, and torch_bridge never executes code from a checkpoint") from e


def load(state_dict, config: GPTConfig, fmt: m.Format, source: str) -> GPT:
    """A GPT holding `state_dict`'s weights. Every key and shape is checked; all problems raise one ValueError."""
    sd = canonical_keys(state_dict, fmt)
    for key in {t.format(i=i) for t in fmt.buffers for i in range(config.n_layer)}:
        sd.pop(key, None)
    embedding, problems = key_of(fmt, m.EMBEDDING), []
    if config.tie_embeddings:  # the head may be stored too; it must be the embedding
        head = sd.pop(m.HEAD, None)
        if head is not None and embedding in sd and not torch.equal(head, sd[embedding]):
            problems.append(f"untied head: {m.HEAD} differs from {embedding} (the model ties them)")
    shapes = param_shapes(config)
    params, missing, misshaped = {}, [], []
    for path, key, how in rows(config, fmt, shapes):
        shape = (vocab_rows(config, fmt), *shapes[path][1:]) if path in VOCAB_PATHS else shapes[path]
        want = torch_shape(shape, how, fmt)
        if key not in sd:
            missing.append(key)
        elif tuple((tensor := sd.pop(key)).shape) != want:
            misshaped.append(f"{key}: got {tuple(tensor.shape)}, expected {want}")
        else:
            array = tensor.detach().cpu().to(torch.float32).numpy().copy()  # else jax on CPU may alias torch's memory
            if isinstance(how, int) and fmt.transpose_linear:
                array = array.T
            array = array.reshape(shape)
            if path in VOCAB_PATHS:  # zero rows for the padded vocabulary: (vocab_size, n_embd)
                array = np.pad(array, [(0, config.vocab_size - array.shape[0]), (0, 0)])
            params[path] = array
    problems += [f"missing keys: {missing}"] * bool(missing) + [f"unexpected keys: {sorted(sd)}"] * bool(sd)
    if problems or misshaped:
        arch = dict(n_layer=config.n_layer, n_embd=config.n_embd, bias=config.bias)
        if config.n_kv_head:
            arch.update(n_head=config.n_head, n_kv_head=config.n_kv_head, mlp_dim=config.mlp_dim,
                        tie_embeddings=config.tie_embeddings)
        problems += [f"wrong shapes: {misshaped}"] * bool(misshaped)
        raise UserValueError(f"{source} does not match a {fmt.name} with "
                             f"{', '.join(f'{k}={v}' for k, v in arch.items())}:\n  " + "\n  ".join(problems))
    tree = unflatten_dict(params)
    if config.scan_layers:  # per-layer trees -> one tree with a leading (n_layer,) axis
        tree["h"] = jax.tree.map(lambda *layers: np.stack(layers), *(tree["h"][i] for i in range(config.n_layer)))
    graphdef, state = nnx.split(abstract(config))
    state.replace_by_pure_dict(jax.tree.map(lambda x: jnp.asarray(x, config.param_dtype), tree))
    return nnx.merge(graphdef, state)


def state_dict(model: GPT, fmt: m.Format) -> dict[str, torch.Tensor]:
    """The model's weights as float32 tensors under the format's keys, a tied head included."""
    config = model.config
    check_expressible(config, fmt)
    tree = jax.tree.map(lambda x: np.array(x, dtype=np.float32), nnx.state(model, nnx.Param).to_pure_dict())
    if config.scan_layers:  # (n_layer, ...) stacked tree -> one tree per layer
        tree["h"] = {i: jax.tree.map(lambda x, i=i: x[i], tree["h"]) for i in range(config.n_layer)}
    flat, out = flatten_dict(tree), {}
    for path, key, how in rows(config, fmt, {p: x.shape for p, x in flat.items()}):
        array = flat[path][:vocab_rows(config, fmt)] if path in VOCAB_PATHS else flat[path]
        if how == "flat":
            array = array.reshape(-1)
        elif isinstance(how, int):
            array = array.reshape(in_out(array.shape, how))
            array = array.T if fmt.transpose_linear else array
            array = array[None] if fmt.conv1d_kernels else array
        out[key] = torch.from_numpy(np.ascontiguousarray(array))
    if config.tie_embeddings:
        out[m.HEAD] = out[key_of(fmt, m.EMBEDDING)]
    return out
