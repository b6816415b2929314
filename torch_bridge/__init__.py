"""Move weights between jaxgpt and PyTorch: Hugging Face GPT2LMHeadModel and LlamaForCausalLM, nanoGPT's ckpt.pt;
and import OpenAI's original GPT-2 release (TensorFlow checkpoints).

    model = from_hf(hf_model_or_dir_or_state_dict, dtype="bfloat16")  # keywords override GPTConfig fields
    save_hf(model, "out/hf");  to_nanogpt(model, "out/ckpt.pt");  model = from_nanogpt("out/ckpt.pt")
    model = from_openai("models/124M")  # what OpenAI's download_model.py fetched

Nothing is downloaded and no pickled code is ever run. See docs/torch_bridge.md.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping

import torch

from jaxgpt.errors import UserFileNotFoundError, UserValueError
from jaxgpt.model import GPT, GPTConfig, merge_lora
from jaxgpt.tokenizer import (
    ENDOFTEXT,
    GPT2_VOCAB_SIZE,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    bundled_gpt2_files,
)
from torch_bridge import convert, tf_checkpoint
from torch_bridge.mapping import COMPILED_PREFIX, EMBEDDING, HF, LLAMA, MODEL_TYPES, NANOGPT, OPENAI, Format

HF_CLASSES = {HF: ("GPT2Config", "GPT2LMHeadModel"), LLAMA: ("LlamaConfig", "LlamaForCausalLM")}


def from_hf(src, *, n_head: int | None = None, **overrides) -> GPT:
    """src: a transformers GPT2LMHeadModel or LlamaForCausalLM, a local HF model directory, or a bare state dict
    (shape inferred; n_head needed for Llama, for GPT-2 it defaults to the preset with the same n_embd).
    `overrides` set GPTConfig fields (dtype, scan_layers)."""
    if isinstance(src, (str, os.PathLike)):
        fmt, hf_config, sd, source = read_hf_dir(src)
    elif isinstance(src, Mapping):
        fmt, hf_config, sd, source = state_dict_format(src), None, src, "state dict"
    else:
        fmt = hf_format(getattr(getattr(src, "config", None), "model_type", None), type(src).__name__)
        hf_config, sd, source = src.config.to_dict(), src.state_dict(), type(src).__name__
    return convert.load(sd, convert.make_config(fmt, hf_config, sd, source, n_head, overrides), fmt, source)


def hf_format(model_type, source: str) -> Format:
    if model_type not in MODEL_TYPES:
        raise UserValueError(f"{source}: model_type is {model_type!r}, expected one of {list(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def state_dict_format(state_dict) -> Format:
    """Llama when its embedding is there (with or without the 'model.' prefix), else GPT-2."""
    embedding = {key.removeprefix(COMPILED_PREFIX) for key in state_dict}
    return LLAMA if {"model.embed_tokens.weight", "embed_tokens.weight"} & embedding else HF


def read_hf_dir(directory) -> tuple[Format, dict, dict, str]:
    """(format, config, state dict, weights file) of a local HF model directory: model.safetensors or
    pytorch_model.bin, or their sharded forms (an .index.json naming the shards)."""
    import safetensors.torch
    import transformers
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise UserFileNotFoundError(f"{directory} is not a Hugging Face model directory: config.json is missing")
    with open(config_path) as f:
        raw = json.load(f)
    fmt = hf_format(raw.get("model_type"), config_path)
    hf_config = getattr(transformers, HF_CLASSES[fmt][0]).from_dict(raw).to_dict()  # defaults filled in
    for name, read in (("model.safetensors", safetensors.torch.load_file), ("pytorch_model.bin", convert.load_pickle)):
        if os.path.isfile(path := os.path.join(directory, name)):
            return fmt, hf_config, read(path), path
        if os.path.isfile(index := path + ".index.json"):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return fmt, hf_config, {k: v for s in shards for k, v in read(os.path.join(directory, s)).items()}, index
    raise UserFileNotFoundError(f"{directory} holds neither model.safetensors nor pytorch_model.bin")


def export_format(config: GPTConfig) -> Format:
    """The Hugging Face format that expresses the model: GPT-2 or Llama; neither is an error naming the fields."""
    problems = {fmt: convert.unsupported(config, fmt) for fmt in HF_CLASSES}
    if fits := [fmt for fmt, p in problems.items() if not p]:
        return fits[0]
    raise UserValueError("no Hugging Face format expresses this model: " + "; ".join(  # the nearer first
        f"as {fmt.name}, {', '.join(p)}" for fmt, p in sorted(problems.items(), key=lambda item: len(item[1]))))


def to_hf(model: GPT):
    """A transformers GPT2LMHeadModel or LlamaForCausalLM (eval mode, whichever expresses the model's
    architecture) with the model's weights, LoRA adapters merged in; padded vocab rows are dropped."""
    import transformers
    model = merge_lora(model)
    c, fmt = model.config, export_format(model.config)
    no_eos = {} if c.n_valid_vocab > 50256 else dict(bos_token_id=None, eos_token_id=None)  # 50256: GPT-2's eos
    if fmt is HF:  # GPT2Config's bos and eos are 50256
        extra = dict(embd_pdrop=c.dropout, attn_pdrop=0.0, **no_eos)  # jaxgpt: no attention dropout
    else:  # LlamaConfig's are 1 and 2
        extra = no_eos or dict(bos_token_id=50256, eos_token_id=50256)
    config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[fmt])
    hf = model_class(config_class(**convert.export_config(c, fmt), **extra))
    hf.load_state_dict(convert.state_dict(model, fmt), strict=True)
    return hf.eval()


def save_hf(model: GPT, out_dir: str, tokenizer: Tokenizer | None = None) -> str:
    """Writes what `transformers.pipeline("text-generation", model=out_dir)` loads offline: config.json and
    model.safetensors, the tokenizer (None: GPT-2 BPE when the model's vocabulary is GPT-2's) and
    generation_config.json."""
    import transformers
    c = model.config
    if tokenizer is None and c.n_valid_vocab >= GPT2_VOCAB_SIZE:
        tokenizer = GPT2Tokenizer()
    if tokenizer is not None and tokenizer.vocab_size > c.n_valid_vocab:
        raise UserValueError(f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{c.n_valid_vocab}")
    to_hf(model).save_pretrained(out_dir)
    if tokenizer is None:
        warnings.warn(f"{out_dir}: no tokenizer written (the model's {c.n_valid_vocab} tokens are not GPT-2's): "
                      "pass tokenizer=", stacklevel=2)
        return out_dir
    hf_tokenizer(tokenizer, c.block_size).save_pretrained(out_dir)
    if isinstance(tokenizer, GPT2Tokenizer):  # the slow tokenizer's files too, for tools that read only those
        files = bundled_gpt2_files()
        shutil.copyfile(files["encoder.json"], os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(files["vocab.bpe"], os.path.join(out_dir, "merges.txt"))
    eot = {} if tokenizer.eot is None else dict(bos_token_id=tokenizer.eot, eos_token_id=tokenizer.eot,
                                                 pad_token_id=tokenizer.eot)
    # jaxgpt.sample's defaults, so that a plain pipeline call samples as `python -m jaxgpt.sample` does
    transformers.GenerationConfig(do_sample=True, temperature=0.8, top_k=200, max_new_tokens=200, **eot
                                  ).save_pretrained(out_dir)
    return out_dir


def hf_tokenizer(tokenizer: Tokenizer, max_length: int):
    """The transformers tokenizer that encodes and decodes exactly as a jaxgpt one."""
    import transformers
    if isinstance(tokenizer, GPT2Tokenizer):
        files = bundled_gpt2_files()
        return transformers.GPT2Tokenizer(vocab=files["encoder.json"], merges=files["vocab.bpe"],
                                          model_max_length=max_length)
    if isinstance(tokenizer, CharTokenizer):
        import tokenizers
        # a BPE without merges splits its input into characters; Fuse joins them back without spaces
        chars = tokenizers.Tokenizer(tokenizers.models.BPE({c: i for i, c in enumerate(tokenizer.chars)}, []))
        chars.decoder = tokenizers.decoders.Fuse()
        return transformers.PreTrainedTokenizerFast(tokenizer_object=chars, model_max_length=max_length,
                                                    clean_up_tokenization_spaces=False)
    if isinstance(tokenizer, BPETokenizer):
        import tokenizers
        copy = tokenizers.Tokenizer.from_str(tokenizer.tokenizer.to_str())
        copy.encode_special_tokens = False  # HF's convention: special-token text is the special token
        special = {} if tokenizer.eot is None else dict(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)
        return transformers.PreTrainedTokenizerFast(tokenizer_object=copy, model_max_length=max_length,
                                                    clean_up_tokenization_spaces=False, **special)
    raise UserValueError(f"no Hugging Face form for the {tokenizer.name} tokenizer")


def from_nanogpt(src, *, n_head: int | None = None, **overrides) -> GPT:
    """src: a nanoGPT ckpt.pt path, its loaded dict ({'model', 'model_args', ...}) or a bare state dict."""
    is_path = isinstance(src, (str, os.PathLike))
    ckpt, source = (convert.load_pickle(src), str(src)) if is_path else (src, "nanoGPT checkpoint")
    if not isinstance(ckpt, Mapping):
        raise UserValueError(f"{source}: expected a nanoGPT checkpoint dict or state dict, got {type(ckpt).__name__}")
    sd, model_args = (ckpt["model"], ckpt.get("model_args")) if "model" in ckpt else (ckpt, None)
    stored = {k: v for k, v in (ckpt.get("config") or {}).items() if k == "valid_vocab_size"}  # see to_nanogpt
    config = convert.make_config(NANOGPT, model_args, sd, source, n_head, {**stored, **overrides})
    return convert.load(sd, config, NANOGPT, source)


def to_nanogpt(model: GPT, path: str) -> str:
    """Writes a nanoGPT ckpt.pt (all vocab rows kept) that nanoGPT's GPT(GPTConfig(**model_args)) loads.
    'config' (nanoGPT keeps its training settings there) records valid_vocab_size for from_nanogpt. LoRA
    adapters are merged in."""
    model = merge_lora(model)
    c = model.config
    convert.check_expressible(c, NANOGPT)
    if c.activation not in NANOGPT.activations.values():
        warnings.warn(f"nanoGPT computes the exact GELU; this model uses {c.activation}, so nanoGPT's logits will "
                      "differ from jaxgpt's", stacklevel=2)
    torch.save({"model": convert.state_dict(model, NANOGPT), "model_args": convert.export_config(c, NANOGPT),
                "iter_num": 0, "best_val_loss": float("inf"), "config": {"valid_vocab_size": c.valid_vocab_size}},
               path)
    return path


def from_openai(directory, **overrides) -> GPT:
    """directory: a model of OpenAI's GPT-2 release (models/124M ... 1558M: hparams.json and the TensorFlow
    checkpoint that its `checkpoint` file names), read without TensorFlow. `overrides` set GPTConfig fields."""
    hparams, hparams_path = read_hparams(os.fspath(directory))
    sd, index = read_tf_variables(os.fspath(directory))
    return convert.load(sd, convert.make_config(OPENAI, hparams, sd, hparams_path, None, overrides), OPENAI, index)


def read_hparams(directory: str) -> tuple[dict, str]:
    """(hyperparameters, path) of an OpenAI GPT-2 model directory's hparams.json."""
    path = os.path.join(directory, "hparams.json")
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{path}: no such file; an OpenAI GPT-2 model directory holds hparams.json "
                                    "and a TensorFlow checkpoint")
    with open(path) as f:
        try:
            hparams = json.load(f)
        except json.JSONDecodeError as e:
            raise UserValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hparams, dict):
        raise UserValueError(f"{path}: expected a JSON object of hyperparameters, got {str(hparams)[:100]}")
    return hparams, path


def read_tf_variables(directory: str) -> tuple[dict, str]:
    """({variable name: tensor}, index file) of the TensorFlow checkpoint in an OpenAI GPT-2 model directory."""
    prefix = tf_checkpoint.checkpoint_prefix(directory)
    variables = tf_checkpoint.read(prefix)
    if (embedding := convert.key_of(OPENAI, EMBEDDING)) not in variables:  # rather than list every key as missing
        raise UserValueError(f"{prefix}.index is not an OpenAI GPT-2 checkpoint: it has no variable {embedding} "
                             f"(it has {', '.join(sorted(variables)[:3]) or 'none'}{', ...' * (len(variables) > 3)})")
    return {name: torch.from_numpy(v) for name, v in variables.items()}, f"{prefix}.index"


__all__ = ["from_hf", "to_hf", "save_hf", "hf_tokenizer", "from_nanogpt", "to_nanogpt", "from_openai"]
