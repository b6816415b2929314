"""The tables between jaxgpt parameter paths and PyTorch state-dict keys, plus per-format settings.

GPT-2 (Hugging Face GPT2LMHeadModel and nanoGPT share key names) has one table, OpenAI's TensorFlow release of
GPT-2 its own, HF Llama (LlamaForCausalLM) another; `Format` records everything else that differs: Linear weight
layout, vocabulary rows, module prefix, config names and which jaxgpt architectures the format can express.
"""
from __future__ import annotations

import dataclasses

# (jaxgpt path, torch key, torch shape): "{i}" is the block index; a row whose path the model lacks (a bias of a
# bias=False model, lm_head of a tied one) is skipped. The torch shape, from the jaxgpt one:
#   None    the same
#   "flat"  flattened to 1-D (a bias over several axes, e.g. c_attn's (3, H, D))
#   n_in    a Linear weight: [in, out] = (prod(shape[:n_in]), prod(shape[n_in:])), stored [out, in] by formats
#           that transpose; jaxgpt kernels are [in..., out...]
GPT2_TABLE = (
    ("wte.embedding", "transformer.wte.weight", None),
    ("wpe.embedding", "transformer.wpe.weight", None),
    ("h.{i}.ln_1.scale", "transformer.h.{i}.ln_1.weight", None),
    ("h.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", None),
    ("h.{i}.attn.c_attn.kernel", "transformer.h.{i}.attn.c_attn.weight", 1),  # (C, 3, H, D): HF's column order
    ("h.{i}.attn.c_attn.bias", "transformer.h.{i}.attn.c_attn.bias", "flat"),
    ("h.{i}.attn.c_proj.kernel", "transformer.h.{i}.attn.c_proj.weight", 2),  # (H, D, C)
    ("h.{i}.attn.c_proj.bias", "transformer.h.{i}.attn.c_proj.bias", None),
    ("h.{i}.ln_2.scale", "transformer.h.{i}.ln_2.weight", None),
    ("h.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias", None),
    ("h.{i}.mlp.c_fc.kernel", "transformer.h.{i}.mlp.c_fc.weight", 1),
    ("h.{i}.mlp.c_fc.bias", "transformer.h.{i}.mlp.c_fc.bias", None),
    ("h.{i}.mlp.c_proj.kernel", "transformer.h.{i}.mlp.c_proj.weight", 1),
    ("h.{i}.mlp.c_proj.bias", "transformer.h.{i}.mlp.c_proj.bias", None),
    ("ln_f.scale", "transformer.ln_f.weight", None),
    ("ln_f.bias", "transformer.ln_f.bias", None),
)
OPENAI_TABLE = (  # OpenAI's TensorFlow variable names (gpt-2's src/model.py); every w is a conv1d kernel [1, in, out]
    ("wte.embedding", "model/wte", None),
    ("wpe.embedding", "model/wpe", None),
    ("h.{i}.ln_1.scale", "model/h{i}/ln_1/g", None),
    ("h.{i}.ln_1.bias", "model/h{i}/ln_1/b", None),
    ("h.{i}.attn.c_attn.kernel", "model/h{i}/attn/c_attn/w", 1),
    ("h.{i}.attn.c_attn.bias", "model/h{i}/attn/c_attn/b", "flat"),
    ("h.{i}.attn.c_proj.kernel", "model/h{i}/attn/c_proj/w", 2),
    ("h.{i}.attn.c_proj.bias", "model/h{i}/attn/c_proj/b", None),
    ("h.{i}.ln_2.scale", "model/h{i}/ln_2/g", None),
    ("h.{i}.ln_2.bias", "model/h{i}/ln_2/b", None),
    ("h.{i}.mlp.c_fc.kernel", "model/h{i}/mlp/c_fc/w", 1),
    ("h.{i}.mlp.c_fc.bias", "model/h{i}/mlp/c_fc/b", None),
    ("h.{i}.mlp.c_proj.kernel", "model/h{i}/mlp/c_proj/w", 1),
    ("h.{i}.mlp.c_proj.bias", "model/h{i}/mlp/c_proj/b", None),
    ("ln_f.scale", "model/ln_f/g", None),
    ("ln_f.bias", "model/ln_f/b", None),
)
LLAMA_TABLE = (
    ("wte.embedding", "model.embed_tokens.weight", None),
    ("h.{i}.ln_1.scale", "model.layers.{i}.input_layernorm.weight", None),
    ("h.{i}.attn.q_proj.kernel", "model.layers.{i}.self_attn.q_proj.weight", 1),  # (C, H, D)
    ("h.{i}.attn.q_proj.bias", "model.layers.{i}.self_attn.q_proj.bias", "flat"),
    ("h.{i}.attn.k_proj.kernel", "model.layers.{i}.self_attn.k_proj.weight", 1),  # (C, K, D)
    ("h.{i}.attn.k_proj.bias", "model.layers.{i}.self_attn.k_proj.bias", "flat"),
    ("h.{i}.attn.v_proj.kernel", "model.layers.{i}.self_attn.v_proj.weight", 1),
    ("h.{i}.attn.v_proj.bias", "model.layers.{i}.self_attn.v_proj.bias", "flat"),
    ("h.{i}.attn.c_proj.kernel", "model.layers.{i}.self_attn.o_proj.weight", 2),  # (H, D, C)
    ("h.{i}.attn.c_proj.bias", "model.layers.{i}.self_attn.o_proj.bias", None),
    ("h.{i}.ln_2.scale", "model.layers.{i}.post_attention_layernorm.weight", None),
    ("h.{i}.mlp.c_gate.kernel", "model.layers.{i}.mlp.gate_proj.weight", 1),
    ("h.{i}.mlp.c_gate.bias", "model.layers.{i}.mlp.gate_proj.bias", None),
    ("h.{i}.mlp.c_fc.kernel", "model.layers.{i}.mlp.up_proj.weight", 1),
    ("h.{i}.mlp.c_fc.bias", "model.layers.{i}.mlp.up_proj.bias", None),
    ("h.{i}.mlp.c_proj.kernel", "model.layers.{i}.mlp.down_proj.weight", 1),
    ("h.{i}.mlp.c_proj.bias", "model.layers.{i}.mlp.down_proj.bias", None),
    ("ln_f.scale", "model.norm.weight", None),
    ("lm_head", "lm_head.weight", None),  # untied models only; stored (V, C) like the embedding
)
EMBEDDING = "wte.embedding"
VOCAB_PARAMS = (EMBEDDING, "lm_head")  # their rows are the vocabulary: padded on import, trimmed on export
HEAD = "lm_head.weight"  # every format's head key, outside the module prefix; a tied one must equal the embedding
COMPILED_PREFIX = "_orig_mod."  # torch.compile'd nanoGPT models save every key under it
GPT2_VOCAB, VOCAB_MULTIPLE = 50257, 64  # HF pads to a multiple of VOCAB_MULTIPLE on import
SPEEDRUN_OFF = dict(qk_norm=False, logit_softcap=0.0, value_embeds=0)  # blocks neither GPT-2 nor Llama has
GPT2_ARCH = dict(norm="layernorm", mlp="gelu", positions="learned", n_kv_head=0, tie_embeddings=True, **SPEEDRUN_OFF)


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per format
class Format:
    name: str  # for messages
    table: tuple
    prefix: str  # of every key but the head's; files of the bare module (GPT2Model, LlamaModel) lack it
    transpose_linear: bool  # nn.Linear stores [out, in]; HF's Conv1D stores [in, out] like jaxgpt
    keeps_padded_vocab: bool  # the file holds the padded rows (nanoGPT) or only the real tokens (HF)
    buffers: tuple[str, ...]  # non-parameter entries some checkpoints carry (causal masks); dropped on import
    fixed: dict  # GPTConfig fields the format's architecture fixes: set on import, required of an exported model
    positive: tuple[str, ...]  # GPTConfig fields an exported model must have > 0
    hints: dict  # GPTConfig field -> what to do when a model's value does not fit
    config_fields: dict  # GPTConfig field -> its config entry: "a.b" is nested, a tuple names entries that agree
    requires: dict  # config entries jaxgpt's model fixes -> accepted values (checked on import, the first exported)
    activation_field: str | None  # the config entry naming the MLP's GELU; None: the format fixes it (or has none)
    activations: dict  # its values -> GPTConfig.activation; the first for each of ours is the one exported
    head_dim_field: str | None = None  # a config entry that must be None or n_embd // n_head
    shape_keys: dict = dataclasses.field(default_factory=dict)  # bare state dicts: field -> (key, axis) sizing it
    bare_defaults: dict = dataclasses.field(default_factory=dict)  # bare state dicts: fields no shape tells
    preset_heads: bool = False  # a bare state dict's n_head may come from the GPT-2 preset of its n_embd
    vocab_field: str = "vocab_size"  # the config entry counting the vocabulary (the embedding's rows)
    closed_config: bool = False  # the config holds these entries only: any other is another architecture's
    conv1d_kernels: bool = False  # Linear weights carry TensorFlow conv1d's width axis first: [1, in, out]


HF = Format("Hugging Face GPT-2", GPT2_TABLE, "transformer.", transpose_linear=False, keeps_padded_vocab=False,
            buffers=("transformer.h.{i}.attn.bias", "transformer.h.{i}.attn.masked_bias"),
            fixed={**GPT2_ARCH, "bias": True}, positive=(),
            hints=dict(bias="export a bias=False model with to_nanogpt"),
            config_fields=dict(block_size="n_positions", n_embd="n_embd", n_layer="n_layer", n_head="n_head",
                               layer_norm_epsilon="layer_norm_epsilon", dropout="resid_pdrop"),
            requires=dict(scale_attn_weights=(True,), scale_attn_by_inverse_layer_idx=(False,)),
            activation_field="activation_function",
            activations={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"},
            shape_keys=dict(n_embd=("transformer.wte.weight", 1), block_size=("transformer.wpe.weight", 0)),
            preset_heads=True)
NANOGPT = Format("nanoGPT GPT-2", GPT2_TABLE, "transformer.", transpose_linear=True, keeps_padded_vocab=True,
                 buffers=("transformer.h.{i}.attn.bias",),
                 fixed={**GPT2_ARCH, "layer_norm_epsilon": 1e-5}, positive=(), hints={},
                 config_fields={k: k for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "dropout")},
                 requires={}, activation_field=None,  # nanoGPT's model_args
                 activations={"gelu": "gelu"},  # nanoGPT's MLP: nn.GELU(), the exact form
                 shape_keys=dict(n_embd=("transformer.wte.weight", 1), block_size=("transformer.wpe.weight", 0)),
                 preset_heads=True)
LLAMA = Format("Hugging Face Llama", LLAMA_TABLE, "model.", transpose_linear=True, keeps_padded_vocab=False,
               buffers=("model.layers.{i}.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq"),
               fixed=dict(norm="rmsnorm", mlp="swiglu", positions="rope", **SPEEDRUN_OFF), positive=("n_kv_head",),
               hints=dict(n_kv_head="set model.n_kv_head=n_head for plain multi-head attention"),
               config_fields=dict(n_embd="hidden_size", mlp_hidden="intermediate_size", n_layer="num_hidden_layers",
                                  n_head="num_attention_heads", n_kv_head="num_key_value_heads",
                                  block_size="max_position_embeddings", layer_norm_epsilon="rms_norm_eps",
                                  tie_embeddings="tie_word_embeddings", rope_theta="rope_parameters.rope_theta",
                                  bias=("attention_bias", "mlp_bias")),
               requires={"rope_parameters.rope_type": ("default",), "hidden_act": ("silu",), "pretraining_tp": (1,)},
               activation_field=None, activations={},  # SwiGLU's SiLU: hidden_act, required above
               head_dim_field="head_dim",
               shape_keys=dict(n_embd=("model.embed_tokens.weight", 1),
                               mlp_hidden=("model.layers.0.mlp.gate_proj.weight", 0),
                               n_kv_head=("model.layers.0.self_attn.k_proj.weight", 0)),  # rows: n_kv_head * D
               bare_defaults=dict(block_size=2048, layer_norm_epsilon=1e-6))  # LlamaConfig's defaults
OPENAI = Format("OpenAI GPT-2", OPENAI_TABLE, "model/", transpose_linear=False, keeps_padded_vocab=False,
                buffers=(), fixed={**GPT2_ARCH, "bias": True, "layer_norm_epsilon": 1e-5}, positive=(), hints={},
                config_fields=dict(n_layer="n_layer", n_head="n_head", n_embd="n_embd", block_size="n_ctx"),
                requires={}, activation_field=None,  # hparams.json
                activations={"gelu": "gelu_tanh"},  # model.py's gelu() is the tanh form
                vocab_field="n_vocab", closed_config=True, conv1d_kernels=True)
MODEL_TYPES = {"gpt2": HF, "llama": LLAMA}  # an HF config's model_type -> its format
