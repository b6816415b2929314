"""The GPU kernel set (a candidate: `model.kernels=gpu`, not a default until a GPU A/B keeps it): the reference math
in the forms the leads of issue 23 point to on NVIDIA GPUs, with no XLA-CPU layout workarounds.

- Dense layers are plain autodiff with outputs in the compute dtype (preferred_element_type=dtype): cuBLAS and
  XLA's Triton GEMMs accumulate half-precision products in float32 whatever the output type, so a float32 output
  then cast only adds a float32 write and read per layer, forward and for the input gradient. The backward pass
  inherits the dtype (JAX's transpose rule keeps preferred_element_type): dx and dw come out in the compute dtype,
  as under PyTorch's autocast; dw is then widened to the float32 master weight's dtype.
- The chunked loss computes its logits in the compute dtype too (nanoGPT's under autocast are bfloat16; the
  cross-entropy widens them to float32), each chunk's gradients in its forward pass as the fast set does.
- GELU, causal ('blocked') attention and the int8 layers are the other sets' (ops/xla_cpu.py's blocked kernel is
  plain einsums off the CPU; int8 serving is not a GPU concern yet). cuDNN attention is `model.attention`'s choice.
In float32 every op here computes what the reference set computes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt import sharding
from jaxgpt.ops.reference import int8_dense, int8_tied_logits, tied_logits  # noqa: F401 (the set's API)

# the set's API, as the fast set has them
from jaxgpt.ops.xla_cpu import causal_attention, fused_cross_entropy, gelu, over_chunks, relu2  # noqa: F401


def dense(x, kernel, bias, dtype, n_in=1):
    y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), n_in, preferred_element_type=dtype)
    if bias is None:
        return y
    # the bias added in float32: its gradient then sums the tokens' cotangents in float32, not in dtype (XLA-CPU
    # accumulates a bfloat16 sum in bfloat16); the add fuses into the output's consumer (GELU, residual, slices)
    return (y.astype(jnp.float32) + bias).astype(dtype)


def chunked_cross_entropy(x, embedding, targets, n_valid, softcap=0.0, scale=1.0):
    """x (n, S, b, c, C), targets (n, S, b, c): as the fast set's, one custom VJP over a loop of chunks whose
    forward pass also takes each chunk's gradients (the head's three matmuls per token, logits never stored), the
    mean loss times `scale` (a loss scale, applied before the gradients are rounded); softcap > 0 caps the logits."""
    return _chunked_cross_entropy(x, embedding, targets, jnp.asarray(scale, jnp.float32), n_valid, softcap)


def _chunks(x, embedding, targets, n_valid, softcap, scale, with_grads: bool):
    """-> (mean NLL times scale, and with_grads: dx (n, S, b, c, C) in x's dtype, dw (V, C) float32). Logits in x's
    dtype, their log-sum-exp and the NLL in float32; the sums over tokens stay one per batch shard (S) until the
    end."""
    n, S, b, c, C = x.shape
    V = embedding.shape[0]
    w = embedding.astype(x.dtype)
    count = jnp.maximum(jnp.sum(targets >= 0), 1).astype(jnp.float32)

    def chunk(xc, tc):  # (S, b, c, C), (S, b, c) -> NLL (S,), dx (S, b, c, C), dw (S, V, C) float32
        logits = jnp.einsum("sbtc,vc->sbtv", xc, w, preferred_element_type=x.dtype)
        logits = sharding.constrain(logits, ("batch", None, None, "vocab"))
        if softcap:  # in float32, as the other sets
            tanh = jnp.tanh(logits.astype(jnp.float32) / softcap)
            logits = softcap * tanh
        if n_valid < V:
            logits = jnp.where(jnp.arange(V) < n_valid, logits, -jnp.inf)
        valid = tc >= 0
        t = jnp.where(valid, tc, 0)
        lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # (S, b, c)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0].astype(jnp.float32)
        nll = sharding.constrain(jnp.where(valid, lse - picked, 0.0).sum((1, 2)), ("batch",))
        if not with_grads:
            return nll, None, None
        probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
        dlogits = (probs - (jnp.arange(V) == t[..., None])) * (valid * scale / count)[..., None]
        if softcap:  # through the cap: 1 - tanh^2
            dlogits = dlogits * (1 - jnp.square(tanh))
        dlogits = dlogits.astype(x.dtype)
        dx = jnp.einsum("sbtv,vc->sbtc", dlogits, w, preferred_element_type=x.dtype)
        dw = jnp.einsum("sbtv,sbtc->svc", dlogits, xc, preferred_element_type=jnp.float32)
        return nll, dx, sharding.constrain(dw, ("batch", "vocab", None))

    nll, dx, dw = over_chunks(chunk, x, targets, V, with_grads)
    return nll.sum() / count * scale, dx, dw


_chunked_cross_entropy = fused_cross_entropy(_chunks)
