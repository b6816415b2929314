"""The fast kernel set: the reference math in the forms XLA's CPU backend runs fastest, with hand-written
backward passes. Autodiff's default forms are slow there:
- a half-precision matmul whose cotangent is float32 runs in float32;
- transposed (TN) half-precision matmuls are upcast to float32;
- batched (3-D) matmuls and vmapped attention reach a fraction of the GEMM rate;
- the head split and merge around attention become slow loop fusions of pads, transposes and casts.
The layout workarounds switch off on other backends and on multi-device meshes, where the same math runs.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxgpt import sharding

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # the mask value jax.nn.dot_product_attention uses
DECODE_ROWS = 64  # up to this many rows, a float32 x @ w^T contracts w's rows in place (decoding's head)


def dense(x, kernel, bias, dtype, n_in=1):
    lead, k_in, k_out = x.shape[:x.ndim - n_in], kernel.shape[:n_in], kernel.shape[n_in:]
    mesh = sharding.current_mesh()
    if kernel.ndim > 2 and not (mesh.empty or mesh.size == 1):
        # on a mesh, flattening (3, heads, head_dim) would merge a sharded heads axis into one that cannot be split
        y = _contract(x.astype(dtype), kernel, n_in)
    else:  # 2-D: XLA-CPU differentiates it faster than the batched form
        y = matmul(x.reshape(-1, math.prod(k_in)).astype(dtype), kernel.reshape(math.prod(k_in), -1))
        y = y.reshape(*lead, *k_out)  # float32
    if bias is not None:
        y = y + bias
    return y.astype(dtype)


def _contract(x, w, n_in: int):
    """x's last n_in axes against w's first n_in, accumulated in float32 (the half-precision backward as matmul)."""
    if x.dtype == jnp.float32:
        return jnp.tensordot(x, w.astype(jnp.float32), n_in, preferred_element_type=jnp.float32)
    return _half_contract(x, w, n_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _half_contract(x, w, n_in):
    return jnp.tensordot(x, w.astype(x.dtype), n_in, preferred_element_type=jnp.float32)


def _half_contract_fwd(x, w, n_in):
    return _half_contract(x, w, n_in), (x, w)


def _half_contract_bwd(n_in, residuals, g):
    x, w = residuals
    g, w_half = g.astype(x.dtype), w.astype(x.dtype)  # g: (*lead, *out)
    n_lead = x.ndim - n_in
    out_g, out_w = tuple(range(n_lead, g.ndim)), tuple(range(n_in, w.ndim))
    dx = jax.lax.dot_general(g, w_half, ((out_g, out_w), ((), ())), preferred_element_type=jnp.float32)
    lead = tuple(range(n_lead))
    dw = jax.lax.dot_general(x, g, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)  # x's and w's shapes


_half_contract.defvjp(_half_contract_fwd, _half_contract_bwd)


def int8_dense(x, kernel, scale, bias, dtype, n_in=1):
    """x (..., *K) @ (kernel (*M, *K) int8, outputs first, * scale (*M) float32) + bias, as `int8_matmul`."""
    lead, k_out, k_in = x.shape[:x.ndim - n_in], kernel.shape[:kernel.ndim - n_in], kernel.shape[kernel.ndim - n_in:]
    y = int8_matmul(x.reshape(-1, math.prod(k_in)), kernel.reshape(-1, math.prod(k_in)), transposed=True)
    y = y.reshape(*lead, *k_out) * scale  # float32
    if bias is not None:
        y = y + bias
    return y.astype(dtype)


def int8_tied_logits(x, embedding, scale):
    """x (B, T, C) @ (embedding (V, C) int8 * scale (V,) per row)^T -> float32 logits (B, T, V); the rows are the
    contracted layout as stored (no transposed copy)."""
    B, T, C = x.shape
    return (int8_matmul(x.reshape(B * T, C), embedding, transposed=True) * scale).reshape(B, T, -1)


def int8_matmul(x, w, transposed: bool):
    """x (N, K) float @ w (K, M) int8 (or w (M, K) when transposed) -> float32 (N, M), without w's scales.

    XLA-CPU has no fast mixed int8 x float dot: converting w to float inside the program materialises the
    converted copy (slower than the float32 dot), and an int8 dot whose left operand has one row takes a slow
    path, many times slower than the same dot from two rows. So x is quantized too, each row to two
    int8 digits, x ~= s_hi * hi + s_lo * lo (`int8_rows`: about 16 bits of x's precision), and both digits go
    through ONE int8 x int8 dot of 2N rows accumulated in int32: never one row, and exact, so a row's result
    depends on that row alone, not on the rest of the batch. int32 cannot overflow: each product is at most
    127 * 127 = 16129 in magnitude, so a sum of K of them stays below 2^31 for K < 133,000 (GPT-2 XL's widest
    contraction, its MLP's 4 * 1600 = 6400, reaches 1.0e8)."""
    digits, s_hi, s_lo = int8_rows(x)
    acc = jax.lax.dot_general(digits, w, (((1,), (1 if transposed else 0,)), ((), ())),
                              preferred_element_type=jnp.int32)  # (2N, M)
    n = x.shape[0]
    return acc[:n].astype(jnp.float32) * s_hi + acc[n:].astype(jnp.float32) * s_lo


def int8_rows(x):
    """x (N, K) -> (digits (2N, K) int8: [hi; lo], s_hi (N, 1), s_lo (N, 1)) with x ~= s_hi * hi + s_lo * lo.

    Per row, symmetric: s_hi = max|x| / 127, hi = round(x / s_hi); the remainder, at most s_hi / 2 in magnitude,
    in steps of s_lo = s_hi / 254: |error| <= s_lo / 2 = max|x| / 64516."""
    x = x.astype(jnp.float32)
    peak = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    s_hi = jnp.where(peak > 0, peak / 127, 1.0)  # a row of zeros: digits 0
    hi = jnp.clip(jnp.round(x / s_hi), -127, 127)
    s_lo = s_hi / 254
    lo = jnp.clip(jnp.round((x - hi * s_hi) / s_lo), -127, 127)
    return jnp.concatenate([hi, lo]).astype(jnp.int8), s_hi, s_lo

def gelu(x, approximate: bool):
    # In float32 whatever the compute dtype: in bfloat16 XLA-CPU would round after every op of the formula.
    return jax.nn.gelu(x.astype(jnp.float32), approximate=approximate).astype(x.dtype)


def relu2(x):
    # in float32 whatever the compute dtype, as gelu
    return jnp.square(jax.nn.relu(x.astype(jnp.float32))).astype(x.dtype)


def tied_logits(x, embedding):
    B, T, C = x.shape
    return matmul_nt(x.reshape(B * T, C), embedding).reshape(B, T, -1)


def chunked_cross_entropy(x, embedding, targets, n_valid, softcap=0.0, scale=1.0):
    """x (n, S, b, c, C), targets (n, S, b, c): a loop over the n chunks under one custom VJP. Differentiated, the
    forward pass also takes each chunk's gradients (softmax - one-hot, through the head's two backward matmuls), so
    the logits are computed once and never stored: the head's three matmuls per token, as without chunks (fused
    cross-entropy kernels do the same). The backward pass only scales those gradients by the loss's cotangent.
    The mean loss times `scale`: a loss scale reaches the gradients before they are rounded to the compute dtype.
    softcap > 0 caps the logits, softcap * tanh(logits / softcap), whose derivative 1 - tanh^2 the gradients carry."""
    return _chunked_cross_entropy(x, embedding, targets, jnp.asarray(scale, jnp.float32), n_valid, softcap)


def fused_cross_entropy(chunks):
    """The loss of `chunks(x, embedding, targets, n_valid, softcap, scale, with_grads) -> (loss, dx, dw)` under one
    custom VJP: differentiated, the forward pass asks chunks for its gradients too and keeps them (never the logits);
    the backward pass only multiplies them by the loss's cotangent. -> loss(x, embedding, targets, scale, n_valid,
    softcap)."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
    def loss(x, embedding, targets, scale, n_valid, softcap):
        return chunks(x, embedding, targets, n_valid, softcap, scale, with_grads=False)[0]

    def loss_fwd(x, embedding, targets, scale, n_valid, softcap):
        value, dx, dw = chunks(x, embedding, targets, n_valid, softcap, scale, with_grads=True)
        return value, (dx, dw.astype(embedding.dtype), value / scale)

    def loss_bwd(n_valid, softcap, residuals, g):
        dx, dw, unscaled = residuals
        times_g = lambda d: (g * d.astype(jnp.float32)).astype(d.dtype)
        return times_g(dx), times_g(dw), None, g * unscaled

    loss.defvjp(loss_fwd, loss_bwd)
    return loss


def _cross_entropy_chunks(x, embedding, targets, n_valid, softcap, scale, with_grads: bool):
    """-> (mean NLL times scale, and with_grads: its gradients dx (n, S, b, c, C) in x's dtype and dw (V, C)
    float32). The sums over tokens stay one per batch shard (S) until the loop ends: on a mesh, one reduction, not
    one a chunk."""
    n, S, b, c, C = x.shape
    V = embedding.shape[0]
    w = embedding.astype(x.dtype)
    count = jnp.maximum(jnp.sum(targets >= 0), 1).astype(jnp.float32)

    def chunk(xc, tc):  # (S, b, c, C), (S, b, c) -> NLL (S,), dx (S, b, c, C), dw (S, V, C): each shard's sums
        x2, t = xc.reshape(-1, C), tc.reshape(-1)  # (N, C), (N,): 2-D, as `dense`
        logits = jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        logits = sharding.constrain(logits, ("batch", "vocab"))  # (N, V) float32
        if softcap:
            tanh = jnp.tanh(logits / softcap)
            logits = softcap * tanh
        if n_valid < V:
            logits = jnp.where(jnp.arange(V) < n_valid, logits, -jnp.inf)
        valid = t >= 0
        t = jnp.where(valid, t, 0)
        lse = jax.nn.logsumexp(logits, axis=-1)  # (N,)
        nll = jnp.where(valid, lse - jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0], 0.0)
        nll = sharding.constrain(nll.reshape(S, -1).sum(-1), ("batch",))
        if not with_grads:
            return nll, None, None
        weight = valid * scale / count  # (N,): the mean's weight of each token, times the loss scale
        dlogits = (jnp.exp(logits - lse[:, None]) - (jnp.arange(V) == t[:, None])) * weight[:, None]
        if softcap:  # through the cap: d(softcap * tanh(z / softcap)) / dz = 1 - tanh^2
            dlogits = dlogits * (1 - jnp.square(tanh))
        dlogits = dlogits.astype(x.dtype)  # rounded to the compute dtype, as the unchunked head's backward pass
        dx = jnp.dot(dlogits, w, preferred_element_type=jnp.float32).astype(x.dtype)  # (N, C)
        if S == 1:  # 2-D, faster on CPU
            dw = _matmul_tn(dlogits, x2)[None]
        else:
            dw = _matmul_tn(dlogits.reshape(S, -1, V), x2.reshape(S, -1, C))
        return nll, dx.reshape(S, b, c, C), sharding.constrain(dw, ("batch", "vocab", None))  # dw float32

    nll, dx, dw = over_chunks(chunk, x, targets, V, with_grads)
    return nll.sum() / count * scale, dx, dw


def over_chunks(chunk, x, targets, V: int, with_grads: bool):
    """chunk(xc (S, b, c, C), tc (S, b, c)) -> (NLL (S,), dx, dw (S, V, C) float32) over the n chunks of x
    (n, S, b, c, C): -> (the NLL summed per shard (S,), dx stacked (n, ...), dw (V, C) laid out as wte), the grads
    None without with_grads. The sums stay one per batch shard until the loop ends: one reduction on a mesh."""
    n, S, _, _, C = x.shape
    if n == 1:  # no loop: a one-trip loop keeps XLA from fusing across it
        nll, dx, dw = chunk(x[0], targets[0])
        dx = None if dx is None else dx[None]
    else:
        def body(carry, chunk_in):
            nll, dw = carry
            nll_chunk, dx, dw_chunk = chunk(*chunk_in)
            return (nll + nll_chunk, None if dw is None else dw + dw_chunk), dx
        dw0 = jnp.zeros((S, V, C), jnp.float32) if with_grads else None
        (nll, dw), dx = jax.lax.scan(body, (jnp.zeros((S,), jnp.float32), dw0), (x, targets))
    return nll, dx, None if dw is None else sharding.constrain(dw.sum(0), ("vocab", "embed"))


_chunked_cross_entropy = fused_cross_entropy(_cross_entropy_chunks)


def causal_attention(qkv, block: int = 128):
    """The 'blocked' attention: q, k, v go heads-major, (B, n_head, T, head_dim), so the products are batched
    matmuls with the batch and head axes leading; queries go in blocks of `block` rows, each against only the keys
    up to its last row, so the fully masked blocks above the diagonal are never computed. One custom VJP covers
    the whole op, head split and merge included, and writes the gradient once, in qkv's layout. The backward pass
    runs under the matmul precision the forward pass was traced with."""
    return _causal_attention(qkv, block, jax.config.jax_default_matmul_precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _causal_attention(qkv, block, precision):
    return _causal_attention_fwd(qkv, block, precision)[0]


def _causal_attention_fwd(qkv, block, precision):
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, n_head, T, head_dim)
    ys, probs = [], []
    for start in range(0, q.shape[2], block):
        end = start + block
        scores = jnp.einsum("bhqd,bhkd->bhqk", q[:, :, start:end], k[:, :, :end],
                            preferred_element_type=jnp.float32)  # (B, n_head, rows, keys)
        rows, keys = scores.shape[2:]
        visible = jnp.arange(start, start + rows)[:, None] >= jnp.arange(keys)[None, :]  # (rows, keys)
        scores = jnp.where(visible, scores * q.shape[-1] ** -0.5, NEG_INF)
        probs.append(jax.nn.softmax(scores, axis=-1))  # float32
        ys.append(jnp.einsum("bhqk,bhkd->bhqd", probs[-1].astype(v.dtype), v[:, :, :end],
                             preferred_element_type=jnp.float32).astype(v.dtype))  # (B, n_head, rows, head_dim)
    y = jnp.concatenate(ys, axis=2).transpose(0, 2, 1, 3)  # (B, T, n_head, head_dim)
    return y, (q, k, v, probs)


def _causal_attention_bwd(block, precision, residuals, dy):
    """Every matmul in the compute dtype, the score gradient rounded to it first (as under PyTorch's autocast),
    the blocks' key and value gradients summed in float32; in float32 this is exactly autodiff's arithmetic."""
    with jax.default_matmul_precision(precision):
        return _causal_attention_grads(block, residuals, dy)


def _causal_attention_grads(block, residuals, dy):
    q, k, v, probs = residuals
    dtype = v.dtype
    dy = dy.astype(dtype).transpose(0, 2, 1, 3)  # (B, n_head, T, head_dim)
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for start, p in zip(range(0, q.shape[2], block), probs):
        end = start + block
        dy_rows = dy[:, :, start:end]
        dprobs = jnp.einsum("bhqd,bhkd->bhqk", dy_rows, v[:, :, :end], preferred_element_type=jnp.float32)
        dscores = p * (dprobs - jnp.sum(dprobs * p, axis=-1, keepdims=True))  # 0 where masked (p == 0)
        dscores = (dscores * q.shape[-1] ** -0.5).astype(dtype)  # (B, n_head, rows, keys)
        dq.append(jnp.einsum("bhqk,bhkd->bhqd", dscores, k[:, :, :end], preferred_element_type=jnp.float32))
        dk = dk.at[:, :, :end].add(_matmul_tn(dscores, q[:, :, start:end]))  # (B, n_head, keys, head_dim)
        dv = dv.at[:, :, :end].add(_matmul_tn(p.astype(dtype), dy_rows))
    dqkv = jnp.stack([jnp.concatenate(dq, axis=2), dk, dv])  # (3, B, n_head, T, head_dim) float32
    return (dqkv.transpose(1, 3, 0, 2, 4).astype(dtype),)  # (B, T, 3, n_head, head_dim)


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def matmul(x, w):
    """x (N, K) in the compute dtype @ w (K, M) cast to it, accumulated in and returned as float32.

    In a half dtype the backward pass multiplies in that dtype too (autodiff would multiply the float32
    cotangent by the half weights: a float32 matmul on CPU), with the cotangent rounded to it first, as under
    PyTorch's autocast. w's gradient stays float32."""
    if x.dtype == jnp.float32:
        return jnp.dot(x, w.astype(jnp.float32), preferred_element_type=jnp.float32)
    return _two_rows(lambda x: _half_matmul(x, w, False), x)


def matmul_nt(x, w):
    """x (N, K) @ w (M, K)^T, as `matmul(x, w.T)`. In a half dtype the product contracts both last axes, w
    untransposed (XLA-CPU upcasts the transposed half-precision form to float32)."""
    if x.dtype == jnp.float32 and x.shape[0] <= DECODE_ROWS:  # w as stored: matmul(x, w.T) copies w transposed
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if x.dtype == jnp.float32:
        return matmul(x, w.T)
    return _two_rows(lambda x: _half_matmul(x, w, True), x)


def _two_rows(product, x):
    """product(x) for x (N, K), with a one-row x padded to two in a half dtype on CPU: there XLA's dot of a
    one-row half-precision (or int8) left operand takes a slow path, many times slower than the same dot from two
    rows (batch-1 decoding; bench/RESULTS.md has the figures)."""
    if x.shape[0] != 1 or not _half_on_cpu(x):
        return product(x)
    return product(jnp.concatenate([x, jnp.zeros_like(x)]))[:1]


def _half_on_cpu(a) -> bool:
    """Whether a half-precision matmul on `a` needs the layout workarounds below: on one CPU device only, since
    on a mesh flattening a sharded array gathers it."""
    mesh = sharding.current_mesh()
    return a.dtype != jnp.float32 and jax.default_backend() == "cpu" and (mesh.empty or mesh.size == 1)


def _row_major(a):
    """a laid out row-major in memory. XLA-CPU runs a half-precision matmul on AMX/AVX512-BF16 only when both
    operands and the result are row-major; given a transposed operand it upcasts it to float32, and a transposed
    result fails at run time ("Unsupported element type for DotThunk::Execute"). Flattening behind an
    optimization barrier forces the layout: a bitcast for a row-major array, one copy for a transposed one."""
    return jax.lax.optimization_barrier(a.reshape(-1)).reshape(a.shape)


def _matmul_tn(a, b):
    """a^T @ b over the last two axes, (..., N, K) and (..., N, M) -> (..., K, M), accumulated in float32: the
    weight-gradient form. In a half dtype on CPU the smaller operand is transposed into row-major memory (XLA's
    transposes are slow) and the product taken in the NN form."""
    def nn(x, y):
        return _row_major(jnp.einsum("...ij,...jk->...ik", x, y, preferred_element_type=jnp.float32))
    if not _half_on_cpu(a):
        return jnp.einsum("...nk,...nm->...km", a, b, preferred_element_type=jnp.float32)
    if a.shape[-1] <= b.shape[-1]:
        return nn(_row_major(a.swapaxes(-1, -2)), b)
    return nn(_row_major(b.swapaxes(-1, -2)), a).swapaxes(-1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _half_matmul(x, w, w_transposed: bool):
    """x @ w for w (K, M), or x @ w^T for w (M, K) when w_transposed; in x's dtype, accumulated in float32."""
    contracted = 1 if w_transposed else 0
    return jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (contracted,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _half_matmul_fwd(x, w, w_transposed):
    return _half_matmul(x, w, w_transposed), (x, w)


def _half_matmul_bwd(w_transposed, residuals, g):
    x, w = residuals
    g, w_half = g.astype(x.dtype), w.astype(x.dtype)  # g: (N, M)
    if w_transposed:  # w: (M, K), already the row-major right operand of dx
        dx, dw = jnp.dot(g, w_half, preferred_element_type=jnp.float32), _matmul_tn(g, x)
    else:  # w: (K, M)
        w_t = _row_major(w_half.T) if _half_on_cpu(x) else w_half.T  # (M, K)
        dx, dw = jnp.dot(g, w_t, preferred_element_type=jnp.float32), _matmul_tn(x, g)
    return dx.astype(x.dtype), dw.astype(w.dtype)  # (N, K), w's shape


_half_matmul.defvjp(_half_matmul_fwd, _half_matmul_bwd)
