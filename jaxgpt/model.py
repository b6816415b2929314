"""GPT-2 in Flax NNX, read top-down: config, layers, attention, MLP, block, the model.

Parameter names follow Hugging Face's GPT2LMHeadModel (wte, wpe, h, ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, ln_f); kernels are stored [in..., out...] with heads as their own axis, (C, 3, H, D) for
c_attn, so tensor parallelism splits whole heads and the bridge is a reshape. The modern blocks are config
switches beside GPT-2's, each picking a layer or function when the model is built (no __call__ branches on one):
RMSNorm, SwiGLU (mlp.c_gate), rotary positions, grouped-query attention (attn.q_proj, k_proj, v_proj, as HF Llama)
and an untied head (lm_head); so are the speedrun's (modded-nanogpt's): QK-norm, ReLU^2, logit soft-capping,
zero-initialised projections and value embeddings (value_embeds, attn.value_mix).
Every parameter names its logical axes ('embed', 'mlp', ...); jaxgpt/sharding.py maps them onto a mesh.
Compute runs in `config.dtype` over `config.param_dtype` weights, through the kernels of jaxgpt/ops.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt import sharding
from jaxgpt.errors import UserValueError
from jaxgpt.ops import ACTIVATIONS, ATTENTION, KERNELS, Ops

PRESETS = {  # name -> (n_layer, n_head, n_embd), the four released GPT-2 sizes
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
REMAT_POLICIES = {  # config.remat -> what a rematerialised block keeps from its forward pass
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
NORMS, MLPS, POSITIONS = ("layernorm", "rmsnorm"), ("gelu", "swiglu", "relu2"), ("learned", "rope")
# GPTConfig fields that change how a model computes, not its weights: every loader may override them.
COMPUTE_FIELDS = ("dtype", "dropout", "scan_layers", "remat", "attention", "kernels", "loss_chunk", "matmul_precision")
DTYPES = ("float32", "bfloat16", "float16")
MATMUL_PRECISIONS = ("default", "high", "highest")  # what a float32 matmul means on a GPU: TF32 / bf16x3 / float32


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304  # embedding rows: GPT-2's 50257 padded to a multiple of 64 for fast matmuls
    valid_vocab_size: int | None = 50257  # rows at and past this are padding (None, or >= vocab_size: none are)
    block_size: int = 1024  # longest sequence (rows of wpe)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # on embeddings and both residual branches, in training only
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2: True; nanoGPT allows False)
    activation: str = "gelu_tanh"  # the MLP's GELU: gelu_tanh (GPT-2, HF gelu_new) | gelu (exact erf, nanoGPT)
    dtype: str = "float32"  # compute dtype: float32, bfloat16 or float16 (fp16 trains under a loss scale)
    param_dtype: str = "float32"  # master weights
    layer_norm_epsilon: float = 1e-5
    init_std: float = 0.02  # std of the normal init; c_proj layers use init_std / sqrt(2 * n_layer)
    scan_layers: bool = False  # stack the blocks and run them with lax.scan (one block compiled, not n_layer)
    remat: str = "none"  # activation checkpointing per block: none | full | dots
    attention: str = "auto"  # auto | blocked | xla | cudnn (see jaxgpt/ops)
    kernels: str = "fast"  # fast | gpu | reference (plain jnp): the kernel set of jaxgpt/ops
    loss_chunk: int = 4096  # tokens per device whose logits the loss holds at once; 0: the whole batch's
    matmul_precision: str = "default"  # float32 matmuls on a GPU: default (TF32) | high (bf16x3) | highest (float32)
    norm: str = "layernorm"  # layernorm (GPT-2) | rmsnorm (scale only, no bias)
    mlp: str = "gelu"  # gelu (GPT-2: c_fc, GELU, c_proj) | relu2 (relu(.)^2 for GELU) | swiglu (Llama's gated form)
    mlp_hidden: int = 0  # the MLP's width; 0: 4 * n_embd (gelu, relu2) or 8/3 * n_embd rounded up to 256 (swiglu)
    positions: str = "learned"  # learned (wpe) | rope (rotary, on queries and keys)
    rope_theta: float = 10000.0  # rotary base
    n_kv_head: int = 0  # 0: GPT-2's fused c_attn; n: separate q/k/v projections with n key/value heads (GQA)
    tie_embeddings: bool = True  # the head is wte; False: its own lm_head (V, C)
    qk_norm: bool = False  # queries and keys RMS-normalised per head (no scale) before rope and attention
    logit_softcap: float = 0.0  # >0: logits = cap * tanh(logits / cap)
    zero_init_proj: bool = False  # attn.c_proj, mlp.c_proj and an untied lm_head start at 0
    value_embeds: int = 0  # extra (V, kv heads * head_dim) tables mixed into the values of the first and last n layers
    lora_rank: int = 0  # >0: low-rank adapters (nnx.LoRAParam) beside the lora_targets' kernels
    lora_alpha: float = 16.0  # adapters add (lora_alpha / lora_rank) * x @ A @ B
    lora_targets: tuple[str, ...] = ("attn",)  # attn (c_attn or q/k/v, attn.c_proj) and/or mlp (c_fc, c_gate, c_proj)
    lora_dropout: float = 0.0  # dropout on the adapters' input, in training

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise UserValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.loss_chunk < 0:
            raise UserValueError(f"loss_chunk={self.loss_chunk} must be 0 (no chunks) or a number of tokens")
        if self.valid_vocab_size is not None and self.valid_vocab_size < 1:
            raise UserValueError(f"valid_vocab_size={self.valid_vocab_size} must be positive")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise UserValueError(f"n_kv_head={self.n_kv_head} must be 0 (fused c_attn) or divide n_head={self.n_head}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # a list when read back from JSON
        if self.lora_rank < 0 or not set(self.lora_targets) <= {"attn", "mlp"} or not self.lora_targets:
            raise UserValueError(f"lora_rank={self.lora_rank}, lora_targets={self.lora_targets}: the rank must be >= 0 "
                                 "and the targets a non-empty set of attn, mlp")
        if self.logit_softcap < 0 or self.value_embeds < 0 or 2 * self.value_embeds > self.n_layer:
            raise UserValueError(f"logit_softcap={self.logit_softcap} must be >= 0 (0: none) and value_embeds="
                                 f"{self.value_embeds} between 0 and n_layer / 2 = {self.n_layer // 2}")
        if self.positions == "rope" and self.head_dim % 2:
            raise UserValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        for name, allowed in (("remat", REMAT_POLICIES), ("attention", ATTENTION), ("kernels", KERNELS),
                              ("activation", ACTIVATIONS), ("norm", NORMS), ("mlp", MLPS), ("positions", POSITIONS),
                              ("dtype", DTYPES), ("param_dtype", DTYPES), ("matmul_precision", MATMUL_PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise UserValueError(f"{name}={getattr(self, name)!r}: expected one of {list(allowed)}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise UserValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return 256 * math.ceil(8 * self.n_embd / 3 / 256) if self.mlp == "swiglu" else 4 * self.n_embd

    @property
    def value_slots(self) -> tuple[int, ...]:
        """The value-embedding table each layer mixes into its values, modded-nanogpt's U-net pattern: tables
        0..n-1 in the first n layers and again in the last n; n (an all-zero slot) in the layers between."""
        n, L = self.value_embeds, self.n_layer
        return tuple(i if i < n else i - (L - n) if i >= L - n else n for i in range(L))

    @property
    def n_lookup_params(self) -> int:
        """Parameters only looked up, never multiplied (wpe, the value embeddings): 6N FLOPs per token leave them
        out."""
        wpe = self.block_size * self.n_embd if self.positions == "learned" else 0
        return wpe + self.value_embeds * self.vocab_size * (self.n_kv_head or self.n_head) * self.head_dim

    @property
    def n_valid_vocab(self) -> int:
        return min(self.vocab_size, self.valid_vocab_size or self.vocab_size)


def matmul_precision(config: GPTConfig) -> str | None:
    """config.matmul_precision as jax.default_matmul_precision's value; None leaves JAX's own setting
    (JAX_DEFAULT_MATMUL_PRECISION, else XLA's default: TF32 on NVIDIA GPUs). JAX's 'high' is TF32 on a GPU too (it
    is bf16x3 on a TPU), so there a float32 model's 'high' names the algorithm; in a half-precision model that
    algorithm would widen the half dots to float32, and 'high' only touches its few float32 dots."""
    name = config.matmul_precision
    if name == "default":
        return None
    if name == "high" and config.dtype == "float32" and jax.default_backend() == "gpu":
        return "BF16_BF16_F32_X3"
    return name


def with_matmul_precision(method):
    """Runs a GPT method under its config's matmul_precision: every dot it traces takes it, and so do their
    gradients (autodiff's transposed dots keep the forward's precision; the kernels' own backward passes too)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        precision = matmul_precision(self.config)
        if precision is None:
            return method(self, *args, **kwargs)
        with jax.default_matmul_precision(precision):
            return method(self, *args, **kwargs)
    return run


def dropout(x, rate: float, key: jax.Array | None):
    """Inverted dropout; identity when no key is given (evaluation) or the rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Scale(nnx.Variable):
    """The float32 per-output-channel scales of an int8 kernel (jaxgpt/quantize.py): weight = kernel * scale. Not
    an nnx.Param, so that nothing that trains, counts or saves parameters takes them; int8 models are for inference."""


def param(init, axes, shape, config: GPTConfig, rngs: nnx.Rngs) -> nnx.Param:
    """A parameter in config.param_dtype, drawn by `init`, naming its logical axes."""
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, config.param_dtype))


class Linear(nnx.Module):
    """x @ kernel + bias with the kernel stored [in..., out...] (HF Conv1D's [in, out], heads kept as an axis):
    d_in and d_out are ints or shapes, x's last len(d_in) axes are contracted."""

    def __init__(self, d_in, d_out, axes, config: GPTConfig, *, rngs: nnx.Rngs, std: float | None = None,
                 lora: str | None = None):
        d_in, d_out = as_shape(d_in), as_shape(d_out)
        init = jax.nn.initializers.normal(config.init_std if std is None else std)
        self.kernel = param(init, axes, (*d_in, *d_out), config, rngs)
        self.bias = (param(jax.nn.initializers.zeros, axes[len(d_in):], d_out, config, rngs) if config.bias
                     else None)
        self.n_in, self.ops = len(d_in), Ops.of(config)
        self.scale = nnx.data(None)  # a Scale (*d_out) when the kernel is int8, then stored (*d_out, *d_in)
        self.lora_scale = None
        if config.lora_rank and lora in config.lora_targets:  # B starts at 0: the adapted layer is the layer
            r = config.lora_rank
            a_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=tuple(range(len(d_in))))
            self.lora_a = nnx.LoRAParam(nnx.with_partitioning(a_init, (*axes[:len(d_in)], None))(
                rngs.params(), (*d_in, r), config.param_dtype))
            self.lora_b = nnx.LoRAParam(nnx.with_partitioning(jax.nn.initializers.zeros, (None, *axes[len(d_in):]))(
                rngs.params(), (r, *d_out), config.param_dtype))
            self.lora_scale, self.lora_dropout = config.lora_alpha / r, config.lora_dropout

    def __call__(self, x, key=None):
        """key: the adapters' dropout in training (None: none)."""
        bias = None if self.bias is None else self.bias[...]
        if self.scale is not None:  # int8: x @ (kernel * scale) + bias
            y = self.ops.int8_dense(x, self.kernel[...], self.scale[...], bias, self.n_in)
        else:
            y = self.ops.dense(x, self.kernel[...], bias, self.n_in)
        if self.lora_scale is None:
            return y
        h = self.ops.dense(dropout(x, self.lora_dropout, key), self.lora_a[...], None, self.n_in)  # (..., r)
        return y + (self.lora_scale * self.ops.dense(h, self.lora_b[...], None, 1)).astype(y.dtype)


def as_shape(d) -> tuple[int, ...]:
    return (d,) if isinstance(d, int) else tuple(d)


class LayerNorm(nnx.Module):
    """LayerNorm with statistics in float32 whatever the compute dtype."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        shape = (config.n_embd,)
        self.scale = param(jax.nn.initializers.ones, ("embed",), shape, config, rngs)
        self.bias = param(jax.nn.initializers.zeros, ("embed",), shape, config, rngs) if config.bias else None
        self.eps, self.dtype = config.layer_norm_epsilon, config.dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, statistics in float32 (HF Llama's LlamaRMSNorm)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.scale = param(jax.nn.initializers.ones, ("embed",), (config.n_embd,), config, rngs)
        self.eps, self.dtype = config.layer_norm_epsilon, config.dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps) * self.scale[...]
        return y.astype(self.dtype)


def norm_layer(config: GPTConfig, *, rngs: nnx.Rngs) -> LayerNorm | RMSNorm:
    """The norm config.norm names: GPT-2's LayerNorm or Llama's RMSNorm."""
    return {"layernorm": LayerNorm, "rmsnorm": RMSNorm}[config.norm](config, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class Rotary:
    """Rotary positions on x (B, T, heads, D) at positions (B or 1, T), HF Llama's convention: the two halves of
    the head dim are the two coordinates of each rotated pair. A value, as SoftCap is."""
    theta: float

    def __call__(self, x, positions):
        D = x.shape[-1]
        inv_freq = 1.0 / self.theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D)  # (D/2,)
        angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
        cos, sin = (jnp.concatenate([f(angles)] * 2, -1)[:, :, None] for f in (jnp.cos, jnp.sin))  # (B, T, 1, D)
        x32 = x.astype(jnp.float32)
        rotated = jnp.concatenate([-x32[..., D // 2:], x32[..., :D // 2]], -1)
        return (x32 * cos + rotated * sin).astype(x.dtype)


def unrotated(x, positions):
    """Learned positions: they were added to the embeddings (add_learned_positions); queries and keys stay."""
    del positions
    return x


def add_learned_positions(model: GPT, x, positions):
    """GPT-2: each token's embedding plus its position's row of wpe."""
    return x + model.wpe(positions)


def add_no_positions(model: GPT, x, positions):
    """Rotary positions: the embeddings stay; each attention turns its queries and keys (Rotary)."""
    del model, positions
    return x


def rms_normalize(x):
    """x / rms(x) over the last axis, no scale (QK-norm: F.rms_norm(x, (x.size(-1),)) as modded-nanogpt), in float32."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + jnp.finfo(jnp.float32).eps)).astype(x.dtype)


def identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class SoftCap:
    """cap * tanh(logits / cap): logits bounded to (-cap, cap), nearly unchanged well inside. A value, so that two
    models of one config have equal graphdefs (jitted programs are cached by them)."""
    cap: float

    def __call__(self, logits):
        return self.cap * jnp.tanh(logits / self.cap)


class Embed(nnx.Module):
    def __init__(self, rows: int, axes, config: GPTConfig, *, rngs: nnx.Rngs, width: int | None = None):
        shape = (rows, width or config.n_embd)
        self.embedding = param(jax.nn.initializers.normal(config.init_std), axes, shape, config, rngs)
        self.scale = nnx.data(None)  # a Scale (rows,) when int8: row i is embedding[i] * scale[i]

    def __call__(self, ids):
        rows = jnp.take(self.embedding[...], ids, axis=0)
        return rows if self.scale is None else rows * jnp.take(self.scale[...], ids, axis=0)[..., None]


def proj_std(config: GPTConfig) -> float:
    """The init std of the residual projections (c_proj): GPT-2's init_std / sqrt(2 * n_layer), or 0."""
    return 0.0 if config.zero_init_proj else config.init_std / math.sqrt(2 * config.n_layer)


class ValueMix(nnx.Module):
    """v' = lambdas[0] * v + lambdas[1] * ve: a value embedding mixed into the values, modded-nanogpt's, both 0.5 at
    init. Every layer has one; those without a table of their own get ve = 0, so they scale v by lambdas[0]."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.lambdas = param(jax.nn.initializers.constant(0.5), (None,), (2,), config, rngs)

    def __call__(self, v, ve):
        lambdas = self.lambdas[...]
        return (lambdas[0] * v + lambdas[1] * ve).astype(v.dtype)


def keep_values(v, ve):
    del ve
    return v


class Attention(nnx.Module):
    """What follows the projections in every attention: QK-norm, the value mix, rotary positions, causal attention
    (or the KV cache's) and c_proj, each picked once here. The subclasses own the projections of q, k and v."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):  # after the subclass's projections: the init order
        self.c_proj = Linear((config.n_head, config.head_dim), config.n_embd, ("heads", None, "embed"), config,
                             rngs=rngs, lora="attn", std=proj_std(config))
        self.qk_norm = rms_normalize if config.qk_norm else identity
        self.value_mix = ValueMix(config, rngs=rngs) if config.value_embeds else keep_values
        self.rotate = Rotary(config.rope_theta) if config.positions == "rope" else unrotated
        self.ops = Ops.of(config)

    def attend(self, q, k, v, positions, cache, proj_key, value_embed):
        """q (B, T, H, D), k and v (B, T, K, D) -> (c_proj of the heads' outputs (B, T, C), cache)."""
        q, k, v = self.qk_norm(q), self.qk_norm(k), self.value_mix(v, value_embed)
        q, k = self.rotate(q, positions), self.rotate(k, positions)
        if cache is None:
            y = self.ops.causal_attention_gqa(q, k, v)  # (B, T, H, D)
        else:  # q attends to the cached keys and values: jaxgpt/generate.py
            y, cache = cache.attend(q, k, v, self.ops)
        return self.c_proj(y, proj_key), cache  # heads merged back: (B, T, C)


class CausalSelfAttention(Attention):
    """GPT-2's: one c_attn (C, 3, H, D) projects queries, keys and values together."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        C, H, D = config.n_embd, config.n_head, config.head_dim
        self.c_attn = Linear(C, (3, H, D), ("embed", None, "heads", None), config, rngs=rngs, lora="attn")
        super().__init__(config, rngs=rngs)
        # GPT-2's path hands c_attn's output to one fused kernel: nothing acts on q, k or v on the way
        self.fused = self.qk_norm is identity and self.value_mix is keep_values and self.rotate is unrotated

    def __call__(self, x, positions, cache=None, lora_key=None, value_embed=None):
        """value_embed: this layer's value embedding (B, T, H, D) when the model has value_embeds."""
        keys = split_key(lora_key, 4)  # as GroupedQueryAttention's: c_attn takes the first, c_proj the last
        qkv = self.c_attn(x, keys[0])  # (B, T, 3, H, D)
        if self.fused and cache is None:
            return self.c_proj(self.ops.causal_attention(qkv), keys[3]), cache
        return self.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], positions, cache, keys[3], value_embed)


class GroupedQueryAttention(Attention):
    """HF Llama's: separate q_proj, k_proj and v_proj; each of the K = n_kv_head key/value heads serves H // K
    query heads."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        C, H, D, K = config.n_embd, config.n_head, config.head_dim, config.n_kv_head
        self.q_proj = Linear(C, (H, D), ("embed", "heads", None), config, rngs=rngs, lora="attn")
        self.k_proj = Linear(C, (K, D), ("embed", "kv_heads", None), config, rngs=rngs, lora="attn")
        self.v_proj = Linear(C, (K, D), ("embed", "kv_heads", None), config, rngs=rngs, lora="attn")
        super().__init__(config, rngs=rngs)

    def __call__(self, x, positions, cache=None, lora_key=None, value_embed=None):
        """value_embed: this layer's value embedding (B, T, K, D) when the model has value_embeds."""
        keys = split_key(lora_key, 4)
        q, k, v = self.q_proj(x, keys[0]), self.k_proj(x, keys[1]), self.v_proj(x, keys[2])  # (B, T, H or K, D)
        return self.attend(q, k, v, positions, cache, keys[3], value_embed)


def attention_layer(config: GPTConfig, *, rngs: nnx.Rngs) -> Attention:
    """GPT-2's fused c_attn (n_kv_head=0), or separate q/k/v projections with n_kv_head key/value heads."""
    return (GroupedQueryAttention if config.n_kv_head else CausalSelfAttention)(config, rngs=rngs)


def split_key(key, n: int):
    """n keys from key, or n Nones (no key: no dropout)."""
    return list(jax.random.split(key, n)) if key is not None else [None] * n


class MLP(nnx.Module):
    """GPT-2's: c_proj(activation(c_fc(x))), the activation GELU (mlp=gelu) or relu(.)^2 (mlp=relu2)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        C, F = config.n_embd, config.mlp_dim
        self.c_fc = Linear(C, F, ("embed", "mlp"), config, rngs=rngs, lora="mlp")
        self.c_proj = Linear(F, C, ("mlp", "embed"), config, rngs=rngs, lora="mlp", std=proj_std(config))
        # Ops' method itself, not bound: a bound method is equal only to itself, and two models' graphdefs would differ
        self.activation, self.ops = {"gelu": Ops.gelu, "relu2": Ops.relu2}[config.mlp], Ops.of(config)

    def __call__(self, x, lora_key=None):
        _, k_fc, k_proj = split_key(lora_key, 3)  # as SwiGLU's three: an adapter draws alike in both
        return self.c_proj(self.activation(self.ops, self.c_fc(x, k_fc)), k_proj)  # through (B, T, F)


class SwiGLU(nnx.Module):
    """Llama's gated MLP: c_proj(silu(c_gate(x)) * c_fc(x))."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        C, F = config.n_embd, config.mlp_dim
        self.c_gate = Linear(C, F, ("embed", "mlp"), config, rngs=rngs, lora="mlp")
        self.c_fc = Linear(C, F, ("embed", "mlp"), config, rngs=rngs, lora="mlp")
        self.c_proj = Linear(F, C, ("mlp", "embed"), config, rngs=rngs, lora="mlp", std=proj_std(config))

    def __call__(self, x, lora_key=None):
        k_gate, k_fc, k_proj = split_key(lora_key, 3)
        return self.c_proj(jax.nn.silu(self.c_gate(x, k_gate)) * self.c_fc(x, k_fc), k_proj)  # through (B, T, F)


def mlp_layer(config: GPTConfig, *, rngs: nnx.Rngs) -> MLP | SwiGLU:
    """The MLP config.mlp names: gelu and relu2 in GPT-2's two-layer form, swiglu Llama's gated one."""
    return (SwiGLU if config.mlp == "swiglu" else MLP)(config, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.ln_1 = norm_layer(config, rngs=rngs)
        self.attn = attention_layer(config, rngs=rngs)
        self.ln_2 = norm_layer(config, rngs=rngs)
        self.mlp = mlp_layer(config, rngs=rngs)
        self.dropout_rate = config.dropout
        self.has_lora_dropout = config.lora_rank > 0 and config.lora_dropout > 0

    def __call__(self, x, positions, key=None, cache=None, value_embed=None):
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        # the adapters' dropout draws from its own fold of the key: the residual dropout stays as without LoRA
        lora_key = jax.random.fold_in(key, 1) if key is not None and self.has_lora_dropout else None
        lora_attn, lora_mlp = split_key(lora_key, 2)
        y, cache = self.attn(self.ln_1(x), positions, cache, lora_attn, value_embed)
        x = x + dropout(y, self.dropout_rate, k1)
        x = x + dropout(self.mlp(self.ln_2(x), lora_mlp), self.dropout_rate, k2)
        return sharding.constrain(x, ("batch", None, None)), cache  # residual stream split by batch only


class GPT(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config, self.ops = config, Ops.of(config)
        self.wte = Embed(config.vocab_size, ("vocab", "embed"), config, rngs=rngs)
        if config.positions == "learned":
            self.wpe = Embed(config.block_size, ("position", "embed"), config, rngs=rngs)
        self.add_positions = add_learned_positions if config.positions == "learned" else add_no_positions
        if config.scan_layers:  # one Block whose parameters carry a leading (n_layer,) 'layers' axis
            @nnx.split_rngs(splits=config.n_layer)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(rngs):
                return Block(config, rngs=rngs)
            self.h = stacked(rngs)
        else:
            self.h = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layer)])
        self.ln_f = norm_layer(config, rngs=rngs)
        if not config.tie_embeddings:  # stored like wte, (V, C), so both heads are one matmul form
            std = 0.0 if config.zero_init_proj else config.init_std
            self.lm_head = param(jax.nn.initializers.normal(std), ("vocab", "embed"),
                                 (config.vocab_size, config.n_embd), config, rngs)
            self.lm_head_scale = nnx.data(None)  # a Scale (V,) when lm_head is int8
        if config.value_embeds:  # rows of the values' width: kv heads * head_dim
            width = (config.n_kv_head or config.n_head) * config.head_dim
            self.value_embeds = nnx.List([Embed(config.vocab_size, ("vocab", "embed"), config, rngs=rngs,
                                                width=width) for _ in range(config.value_embeds)])
        self.softcap = SoftCap(config.logit_softcap) if config.logit_softcap else identity

    @with_matmul_precision
    def __call__(self, idx, *, rng: jax.Array | None = None, cache=None, positions=None):
        """idx (B, T) int tokens -> float32 logits (B, T, vocab_size).

        rng: a key turns dropout on (training); None is evaluation. cache/positions: see jaxgpt/generate.py.
        """
        x, cache = self.hidden(idx, rng=rng, cache=cache, positions=positions)
        return self.logits(x), cache

    @with_matmul_precision
    def loss(self, idx, targets, *, rng: jax.Array | None = None, scale=None):
        """idx, targets (B, T) -> the mean cross-entropy of the targets >= 0, float32: cross_entropy(logits,
        targets) with the logits of about loss_chunk tokens per device at a time (jaxgpt/ops), never all.

        scale: the loss comes back multiplied by it (float16's loss scale, jaxgpt/loss_scale.py), so that the
        gradients the chunked loss takes in its forward pass are scaled before they are rounded to float16."""
        x, _ = self.hidden(idx, rng=rng)
        scale = 1.0 if scale is None else scale
        if self.config.loss_chunk == 0:
            return cross_entropy(self.logits(x), targets) * scale
        return self.ops.tied_cross_entropy(x, self.head(), targets, self.config.n_valid_vocab,
                                           self.config.loss_chunk, self.config.logit_softcap, scale)

    @with_matmul_precision
    def hidden(self, idx, *, rng: jax.Array | None = None, cache=None, positions=None):
        """idx (B, T) -> (the head's input: ln_f's output (B, T, C) in the compute dtype, cache); as __call__."""
        cfg = self.config
        B, T = idx.shape
        if T > cfg.block_size:
            raise UserValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        if positions is None:
            positions = jnp.arange(T)[None]  # (1, T)
        keys = jax.random.split(rng, cfg.n_layer + 1) if rng is not None else [None] * (cfg.n_layer + 1)
        x = self.add_positions(self, self.wte(idx), positions)
        x = sharding.constrain(dropout(x.astype(cfg.dtype), cfg.dropout, keys[0]), ("batch", None, None))  # (B, T, C)
        x, cache = self.blocks(x, positions, None if rng is None else keys[1:], cache, self.value_embeddings(idx))
        return self.ln_f(x), cache

    def value_embeddings(self, idx):
        """The value embeddings of idx (B, T): (value_embeds + 1, B, T, kv heads, head_dim), the last slot all
        zeros, which config.value_slots index per layer; None for a model without them."""
        cfg = self.config
        if not cfg.value_embeds:
            return None
        rows = [table(idx).astype(cfg.dtype) for table in self.value_embeds]  # (B, T, K * D) each
        return jnp.stack([*rows, jnp.zeros_like(rows[0])]).reshape(len(rows) + 1, *idx.shape, -1, cfg.head_dim)

    def blocks(self, x, positions, keys, cache, value_embeds):
        """The blocks over x; value_embeds (slots, B, T, K, D) or None, of which layer i reads slot value_slots[i]."""
        cfg, policy = self.config, REMAT_POLICIES[self.config.remat]
        slots = None if value_embeds is None else jnp.asarray(cfg.value_slots)

        def run(block, x, positions, key, layer_cache, slot):
            return block(x, positions, key, layer_cache, None if value_embeds is None else value_embeds[slot])
        if cfg.remat != "none":
            run = nnx.remat(run, policy=policy)
        if not cfg.scan_layers:
            caches = []
            for i, block in enumerate(self.h):
                x, c = run(block, x, positions, None if keys is None else keys[i],
                           None if cache is None else cache[i], None if slots is None else cfg.value_slots[i])
                caches.append(c)
            return x, None if cache is None else caches

        @nnx.scan(in_axes=(0, nnx.Carry, None, 0, 0, 0), out_axes=(nnx.Carry, 0),
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan(block, x, positions, key, layer_cache, slot):
            return run(block, x, positions, key, layer_cache, slot)
        return scan(self.h, x, positions, keys, cache, slots)

    def head(self):
        """The (V, C) output embedding: wte when tied, else lm_head (dequantized when int8)."""
        w, scale = self.stored_head()
        return w if scale is None else w.astype(jnp.float32) * scale[:, None]

    def stored_head(self):
        """-> (the stored (V, C) head, its per-row Scale's values or None)."""
        if self.config.tie_embeddings:
            return self.wte.embedding[...], None if self.wte.scale is None else self.wte.scale[...]
        return self.lm_head[...], None if self.lm_head_scale is None else self.lm_head_scale[...]

    @with_matmul_precision
    def logits(self, x):
        """The head. Padded vocab rows get -inf logits: softmax gives them probability 0, so they are never
        sampled, and since targets are real tokens they never change a loss (nor receive gradient)."""
        w, scale = self.stored_head()
        logits = self.softcap(self.ops.tied_logits(x, w) if scale is None
                              else self.ops.int8_tied_logits(x, w, scale))  # (B, T, vocab_size) float32
        if self.config.n_valid_vocab < self.config.vocab_size:
            logits = jnp.where(jnp.arange(self.config.vocab_size) < self.config.n_valid_vocab, logits, -jnp.inf)
        return logits


def token_nll(logits, targets):
    """Each token's negative log-likelihood in float32; 0 where targets < 0 (ignored, like PyTorch's ignore_index)."""
    valid = targets >= 0
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.where(valid, -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0], 0.0)


def cross_entropy(logits, targets):
    """Mean token loss in float32; targets < 0 are ignored."""
    return jnp.sum(token_nll(logits, targets)) / jnp.maximum(jnp.sum(targets >= 0), 1)


def with_weights(m: GPT, weights: nnx.State) -> nnx.State:
    """m's parameters with those `weights` names replaced by them (a LoRA model's base from a pretrained one)."""
    from flax.traverse_util import flatten_dict, unflatten_dict
    ours, theirs = flatten_dict(nnx.state(m, nnx.Param).to_pure_dict()), flatten_dict(weights.to_pure_dict())
    state = nnx.state(m, nnx.Param)
    state.replace_by_pure_dict(unflatten_dict({**ours, **theirs}))
    return state


def merge_lora(m: GPT) -> GPT:
    """The model with each adapter folded into its kernel, W + (lora_alpha / lora_rank) * A @ B, and no adapters:
    what an exported checkpoint holds."""
    from flax.traverse_util import flatten_dict, unflatten_dict
    cfg = m.config
    if not cfg.lora_rank:
        return m
    values = flatten_dict(nnx.state(m, nnx.Param).to_pure_dict())
    contract = (lambda a, b: jnp.tensordot(a, b, 1)) if not cfg.scan_layers else jax.vmap(
        lambda a, b: jnp.tensordot(a, b, 1))  # scan_layers: one adapter per stacked layer
    for path in [p for p in values if p[-1] == "lora_a"]:
        a, b, kernel = values.pop(path), values.pop((*path[:-1], "lora_b")), (*path[:-1], "kernel")
        values[kernel] = (values[kernel] + cfg.lora_alpha / cfg.lora_rank * contract(a, b)).astype(values[kernel].dtype)
    graphdef, target = nnx.split(abstract(dataclasses.replace(cfg, lora_rank=0)))
    target.replace_by_pure_dict(unflatten_dict(values))
    return nnx.merge(graphdef, target)


def num_params(model: GPT) -> int:
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def build(config: GPTConfig, seed: int = 0) -> GPT:
    """A freshly initialised model, on or off a mesh (sharding is applied later by jaxgpt/sharding.py)."""
    with nnx.use_eager_sharding(False):
        return GPT(config, rngs=nnx.Rngs(seed))


def abstract(config: GPTConfig) -> GPT:
    """The model's structure with ShapeDtypeStruct parameters: shapes and logical axes, nothing computed."""
    return nnx.eval_shape(lambda: build(config))
