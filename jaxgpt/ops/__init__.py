"""The model's compute behind one API, `Ops`: dense layers, GELU and ReLU^2, causal attention, the tied head and its
loss.

Three kernel sets compute the same math: `reference` (plain jnp, the definition), `fast` (xla_cpu.py: the forms
XLA's CPU backend runs fastest) and `gpu` (gpu.py: a candidate for NVIDIA GPUs, outputs in the compute dtype).
Attention: blocked (the set's own causal kernel), xla or cudnn
(jax.nn.dot_product_attention), or auto (cudnn on GPU in half precision, else blocked). See docs/architecture.md.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxgpt import sharding
from jaxgpt.ops import gpu, reference, xla_cpu

KERNELS = {"fast": xla_cpu, "reference": reference, "gpu": gpu}
ATTENTION = ("auto", "blocked", "xla", "cudnn")
ACTIVATIONS = ("gelu_tanh", "gelu")  # GPT-2's (HF "gelu_new") and the exact erf form (nanoGPT's nn.GELU())


def resolve_attention(name: str, dtype: str) -> str:
    """The implementation causal attention `name` runs (the KV cache's attention is generate.cache_attention)."""
    if name != "auto":
        return name
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if half and jax.default_backend() == "gpu" else "blocked"


@dataclasses.dataclass(frozen=True)
class Ops:
    """How a model computes: a kernel set, an attention implementation and the compute dtype."""
    kernels: str = "fast"
    attention: str = "auto"
    dtype: str = "float32"
    activation: str = "gelu_tanh"

    @classmethod
    def of(cls, config) -> Ops:
        return cls(config.kernels, config.attention, config.dtype, config.activation)

    def dense(self, x, kernel, bias=None, n_in: int = 1):
        """x (..., *K) @ kernel (*K, *M) + bias (*M) -> (..., *M), K being kernel's first n_in axes, in the compute
        dtype, accumulated in float32."""
        return KERNELS[self.kernels].dense(x, kernel, bias, self.dtype, n_in)

    def int8_dense(self, x, kernel, scale, bias=None, n_in: int = 1):
        """x (..., *K) @ (kernel (*M, *K) int8, stored outputs first, * scale (*M) float32, its per-output-channel
        scales) + bias, in the compute dtype: a weight-only int8 layer (jaxgpt/quantize.py)."""
        return KERNELS[self.kernels].int8_dense(x, kernel, scale, bias, self.dtype, n_in)

    def int8_tied_logits(self, x, embedding, scale):
        """x (B, T, C) @ (embedding (V, C) int8 * scale (V,), one scale per row)^T -> float32 logits (B, T, V)."""
        return KERNELS[self.kernels].int8_tied_logits(x, embedding, scale)

    def gelu(self, x):
        """GELU in its tanh (GPT-2) or exact (erf) form, in x's dtype."""
        return KERNELS[self.kernels].gelu(x, approximate=self.activation == "gelu_tanh")

    def relu2(self, x):
        """relu(x)^2 (modded-nanogpt's MLP activation), in x's dtype."""
        return KERNELS[self.kernels].relu2(x)

    def tied_logits(self, x, embedding):
        """x (B, T, C) @ embedding (V, C)^T -> float32 logits (B, T, V)."""
        return KERNELS[self.kernels].tied_logits(x, embedding)

    @jax.named_scope("loss")  # op names in profiles carry the scope (bench/gpu/trace_table.py groups by it)
    def tied_cross_entropy(self, x, embedding, targets, n_valid: int, chunk_tokens: int, softcap: float = 0.0,
                           scale=1.0):
        """The mean cross-entropy of the tied head's logits x (B, T, C) @ embedding (V, C)^T against targets
        (B, T), float32, times `scale` (a loss scale); targets < 0 are ignored and vocab rows >= n_valid excluded
        (-inf logits); softcap > 0 caps the logits first, softcap * tanh(logits / softcap).

        The logits of about chunk_tokens tokens per device exist at a time: each example's positions go in chunks
        of c, every example at once, so a batch split over S devices stays split and the chunk loop runs on every
        device alike; the S shards get an axis of their own, along which the kernels keep each device's partial sums
        until the loop ends. Chunks past T are padding with ignored targets."""
        B, T, C = x.shape
        b = local_rows(B)
        c = min(T, max(1, chunk_tokens // b))
        n = math.ceil(T / c)
        c = math.ceil(T / n)  # the same number of chunks, the least padding
        if n * c > T:
            x = jnp.pad(x, ((0, 0), (0, n * c - T), (0, 0)))
            targets = jnp.pad(targets, ((0, 0), (0, n * c - T)), constant_values=-1)
        xs = x.reshape(B // b, b, n, c, C).transpose(2, 0, 1, 3, 4)  # (n, S, b, c, C)
        ts = targets.reshape(B // b, b, n, c).transpose(2, 0, 1, 3)  # (n, S, b, c)
        xs = sharding.constrain(xs, (None, "batch", None, None, None))
        ts = sharding.constrain(ts, (None, "batch", None, None))
        return KERNELS[self.kernels].chunked_cross_entropy(xs, embedding, ts, n_valid, softcap, scale)

    @jax.named_scope("attention")
    def causal_attention(self, qkv):
        """qkv (B, T, 3, n_head, head_dim), c_attn's output -> y (B, T, n_head, head_dim)."""
        implementation = resolve_attention(self.attention, self.dtype)
        if implementation == "blocked":
            return KERNELS[self.kernels].causal_attention(qkv)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

    @jax.named_scope("attention")
    def causal_attention_gqa(self, q, k, v):
        """q (B, T, n_head, head_dim), k and v (B, T, n_kv_head, head_dim) -> y (B, T, n_head, head_dim); each
        key/value head serves n_head // n_kv_head consecutive query heads."""
        implementation = resolve_attention(self.attention, self.dtype)
        if implementation == "blocked":
            group = q.shape[2] // k.shape[2]
            k, v = (jnp.repeat(t, group, axis=2) for t in (k, v))  # the blocked kernel takes one head count
            return KERNELS[self.kernels].causal_attention(jnp.stack([q, k, v], axis=2))
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def local_rows(B: int) -> int:
    """The rows of a batch of B that each device holds under the current mesh (all of them off a mesh, or when the
    mesh does not divide B: then the batch stays whole, as sharding.spec_for leaves it)."""
    mesh = sharding.current_mesh()
    shards = 1 if mesh.empty else sharding.batch_shards(mesh)
    return B // shards if B % shards == 0 else B
