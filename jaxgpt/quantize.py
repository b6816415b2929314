"""Decoding weights: a trained model converted to float32, bfloat16 or int8 weights, for inference only.

    model = quantize.convert(model, "int8")   # then model(ids, ...), generate.generate(model, ...) as before

- float32: the model as it is.
- bfloat16: every weight stored in bfloat16 (half the memory), the compute dtype BF16_COMPUTE.
- int8: weight-only int8. Every Linear kernel (c_attn, q/k/v_proj, attn.c_proj, c_fc, c_gate, mlp.c_proj) is int8
  with a float32 `Scale` per output channel: max |w| over the kernel's input axes / 127, symmetric, rounded to
  nearest. The head/embedding wte (V, C) (and an untied lm_head) is int8 with one scale per vocabulary row, which
  is both the embedding row's scale and the head's output-channel scale. wpe, the value embeddings, the norms,
  the biases and the value-mix lambdas stay float32, and so do the activations: the int8 layers (jaxgpt/ops:
  int8_dense, int8_tied_logits) carry x at about 16 bits, so the error is the weights' alone. A quarter of
  float32's memory for the big matrices.

The result is a plain GPT module: __call__, hidden, logits, loss and jaxgpt.generate work as for float32. A LoRA
model's adapters are merged into its kernels first. The scales are `model.Scale` variables, not nnx.Param, and int8
kernels have no gradient: a converted model is not for training, nor for checkpoint.save (which saves Params).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxgpt.errors import UserValueError
from jaxgpt.model import GPT, Linear, Scale, abstract, merge_lora

WEIGHTS = ("float32", "bfloat16", "int8")
# The compute dtype over bfloat16 weights: float32 compute would materialise the converted weights at every step,
# which makes it the slower for batch-1 decoding on XLA-CPU (bench/serve.py times it).
BF16_COMPUTE = "bfloat16"


def convert(model: GPT, weights: str, *, bf16_compute: str = BF16_COMPUTE) -> GPT:
    """The model with its weights in `weights` (one of WEIGHTS); float32 returns `model` itself. bf16_compute: the
    compute dtype over bfloat16 weights."""
    if weights not in WEIGHTS:
        raise UserValueError(f"weights={weights!r}: expected one of {list(WEIGHTS)}")
    if weights == "float32":
        return model
    model = merge_lora(model)
    if weights == "bfloat16":
        return _rebuilt(model, param_dtype="bfloat16", dtype=bf16_compute)
    return _int8(_rebuilt(model, param_dtype="float32", dtype="float32"))


def _rebuilt(model: GPT, **fields) -> GPT:
    """A new model with these config fields and model's weights cast to its param_dtype."""
    config = dataclasses.replace(model.config, **fields)
    values = flatten_dict(nnx.state(model, nnx.Param).to_pure_dict())
    values = {path: v.astype(config.param_dtype) for path, v in values.items()}
    graphdef, target = nnx.split(abstract(config))
    target.replace_by_pure_dict(unflatten_dict(values))
    return nnx.merge(graphdef, target)


def quantize(w, in_axes: tuple[int, ...]):
    """w float -> (q int8 of w's shape, scale float32 of w's shape without in_axes): w ~= q * scale, symmetric per
    output channel, scale = max |w| over in_axes / 127 (1 for an all-zero channel), q = round(w / scale)."""
    w = w.astype(jnp.float32)
    peak = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True)
    scale = jnp.where(peak > 0, peak / 127, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, in_axes)


def _int8(model: GPT) -> GPT:
    """Quantizes model's kernels and head in place (model is _rebuilt's fresh copy). Kernels are stored outputs
    first, (*M, *K) as torch's nn.Linear: XLA-CPU's int8 dot of a few rows runs about twice as fast against them."""
    config = model.config
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, Linear):
            lead = 1 if config.scan_layers and path[0] == "h" else 0  # the stacked layers' axis
            node.kernel, node.scale = _quantized(node.kernel, tuple(range(lead, lead + node.n_in)), lead)
    embedding = model.wte if config.tie_embeddings else None
    if embedding is not None:
        embedding.embedding, embedding.scale = _quantized(embedding.embedding, (1,), 0)
    else:
        model.lm_head, model.lm_head_scale = _quantized(model.lm_head, (1,), 0)
    return model


def _quantized(variable: nnx.Variable, in_axes: tuple[int, ...], lead: int) -> tuple[nnx.Param, Scale]:
    """variable's int8 Param, its output axes moved before in_axes (after any leading layers axis), and its Scale;
    each keeps variable's metadata, the logical axes permuted alike."""
    q, scale = quantize(variable[...], in_axes)
    order = (*range(lead), *(i for i in range(lead, q.ndim) if i not in in_axes), *in_axes)
    metadata = dict(variable.get_metadata())
    axes = metadata.get("out_sharding")
    scale_metadata = dict(metadata)
    if axes is not None:
        metadata["out_sharding"] = tuple(axes[i] for i in order)
        scale_metadata["out_sharding"] = tuple(a for i, a in enumerate(axes) if i not in in_axes)
    return nnx.Param(jnp.transpose(q, order), **metadata), Scale(jax.device_put(scale), **scale_metadata)
