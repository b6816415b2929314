"""The one table between jaxgpt parameter paths and PyTorch GPT-2 state-dict keys, plus per-format settings.

Both PyTorch layouts (Hugging Face GPT2LMHeadModel and nanoGPT) share key names; they differ only in how a
Linear weight is stored and in how the vocabulary rows are kept, which `Format` records.
"""
from __future__ import annotations

import dataclasses

# (jaxgpt path, torch key, is a Linear weight); "{i}" is the block index. jaxgpt kernels are [in, out].
TABLE = (
    ("wte.embedding", "transformer.wte.weight", False),
    ("wpe.embedding", "transformer.wpe.weight", False),
    ("h.{i}.ln_1.scale", "transformer.h.{i}.ln_1.weight", False),
    ("h.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", False),
    ("h.{i}.attn.c_attn.kernel", "transformer.h.{i}.attn.c_attn.weight", True),
    ("h.{i}.attn.c_attn.bias", "transformer.h.{i}.attn.c_attn.bias", False),
    ("h.{i}.attn.c_proj.kernel", "transformer.h.{i}.attn.c_proj.weight", True),
    ("h.{i}.attn.c_proj.bias", "transformer.h.{i}.attn.c_proj.bias", False),
    ("h.{i}.ln_2.scale", "transformer.h.{i}.ln_2.weight", False),
    ("h.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias", False),
    ("h.{i}.mlp.c_fc.kernel", "transformer.h.{i}.mlp.c_fc.weight", True),
    ("h.{i}.mlp.c_fc.bias", "transformer.h.{i}.mlp.c_fc.bias", False),
    ("h.{i}.mlp.c_proj.kernel", "transformer.h.{i}.mlp.c_proj.weight", True),
    ("h.{i}.mlp.c_proj.bias", "transformer.h.{i}.mlp.c_proj.bias", False),
    ("ln_f.scale", "transformer.ln_f.weight", False),
    ("ln_f.bias", "transformer.ln_f.bias", False),
)
EMBEDDING = "wte.embedding"  # its rows are the vocabulary: padded on import, trimmed on export where needed
TIED_HEAD = "lm_head.weight"  # both formats may store the tied head; it must equal wte and is rewritten on export
COMPILED_PREFIX = "_orig_mod."  # torch.compile'd nanoGPT models save every key under it
MODULE_PREFIX = "transformer."  # GPT2Model files (the hub's original gpt2 weights) save keys without it
GPT2_VOCAB, VOCAB_MULTIPLE = 50257, 64  # HF pads to a multiple of VOCAB_MULTIPLE on import


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    transpose_linear: bool  # nn.Linear stores [out, in]; HF's Conv1D stores [in, out] like jaxgpt
    keeps_padded_vocab: bool  # the file holds the padded rows (nanoGPT) or only the real tokens (HF)
    buffers: tuple[str, ...]  # non-parameter entries some checkpoints carry (causal masks); dropped on import
    config_fields: dict  # GPTConfig field -> the format's config name (vocab_size is handled separately)
    requires: dict  # format config entries jaxgpt's model fixes -> accepted values (checked on import)
    activation_field: str | None  # the config entry naming the MLP's GELU; None: the format fixes it
    activations: dict  # its values -> GPTConfig.activation; the first for each of ours is the one exported


HF = Format("hf", transpose_linear=False, keeps_padded_vocab=False,
            buffers=("transformer.h.{i}.attn.bias", "transformer.h.{i}.attn.masked_bias"),
            config_fields=dict(block_size="n_positions", n_embd="n_embd", n_layer="n_layer", n_head="n_head",
                               layer_norm_epsilon="layer_norm_epsilon", dropout="resid_pdrop"),
            requires=dict(scale_attn_weights=(True,), scale_attn_by_inverse_layer_idx=(False,)),
            activation_field="activation_function",
            activations={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"})
NANOGPT = Format("nanogpt", transpose_linear=True, keeps_padded_vocab=True, buffers=("transformer.h.{i}.attn.bias",),
                 config_fields={k: k for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "dropout")},
                 requires={}, activation_field=None,  # nanoGPT's model_args; LayerNorm epsilon fixed at 1e-5
                 activations={"gelu": "gelu"})  # nanoGPT's MLP: nn.GELU(), the exact form
