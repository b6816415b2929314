"""The reference kernel set: the model's math in plain jnp, differentiated by autodiff. The definition that the
fast set (xla_cpu.py) is held equal to."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dense(x, kernel, bias, dtype, n_in=1):
    y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), n_in, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias
    return y.astype(dtype)


def gelu(x, approximate: bool):
    return jax.nn.gelu(x, approximate=approximate)


def relu2(x):
    return jnp.square(jax.nn.relu(x))


def tied_logits(x, embedding):
    return jnp.einsum("btc,vc->btv", x, embedding.astype(x.dtype), preferred_element_type=jnp.float32)


def causal_attention(qkv):
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, n_head, head_dim)
    T = q.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)  # (B, n_head, T, T)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


def chunked_cross_entropy(x, embedding, targets, n_valid, softcap=0.0, scale=1.0):
    """x (n, S, b, c, C), targets (n, S, b, c): a loop over the n chunks whose backward pass recomputes each
    chunk's logits (jax.checkpoint) instead of storing them. The mean loss times scale."""
    @jax.checkpoint
    def chunk_nll(xc, tc):  # (S, b, c, C), (S, b, c) -> summed NLL
        xc, tc = xc.reshape(-1, *xc.shape[2:]), tc.reshape(-1, tc.shape[-1])  # (S * b, c, C), (S * b, c)
        logits = tied_logits(xc, embedding)  # (S * b, c, V) float32
        if softcap:
            logits = softcap * jnp.tanh(logits / softcap)
        logits = jnp.where(jnp.arange(logits.shape[-1]) < n_valid, logits, -jnp.inf)
        valid = tc >= 0
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.where(valid, tc, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, nll, 0.0))
    sums = jax.lax.map(lambda chunk: chunk_nll(*chunk), (x, targets))  # (n,)
    return jnp.sum(sums) / jnp.maximum(jnp.sum(targets >= 0), 1) * scale


def int8_dense(x, kernel, scale, bias, dtype, n_in=1):
    """The weight-only int8 layer's definition: the float32 layer over the dequantized kernel (*M, *K), its
    outputs first, kernel * scale, moved back to (*K, *M)."""
    m = kernel.ndim - n_in
    w = kernel.astype(jnp.float32) * scale.reshape(*scale.shape, *[1] * n_in)
    return dense(x.astype(jnp.float32), jnp.transpose(w, (*range(m, kernel.ndim), *range(m))), bias, dtype, n_in)


def int8_tied_logits(x, embedding, scale):
    return tied_logits(x.astype(jnp.float32), embedding.astype(jnp.float32) * scale[:, None])
