"""torch_bridge and Hugging Face Llama: logits, loss and greedy parity, bit-exact round trips, detection, refusals."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from flax.traverse_util import flatten_dict

import torch_bridge
from jaxgpt import checkpoint, generate, tokenizer
from jaxgpt.model import GPTConfig, build, cross_entropy
from torch_bridge import LLAMA, convert
from torch_bridge.__main__ import main as cli_main

IDX = np.random.default_rng(0).integers(0, 100, (2, 24))  # tokens valid in every vocab here
PROMPTS = [[5, 17, 42, 8, 99, 3, 61, 23, 70, 12, 1], [88, 4, 31]]  # 11 and 3 tokens
# (num_key_value_heads, tie_word_embeddings, bias, vocab_size): GQA and plain multi-head, tied and untied,
# biased, and a vocabulary that needs no padding
SHAPES = [(2, False, False, 100), (2, True, False, 100), (4, False, False, 100), (4, True, False, 128),
          (2, False, True, 100)]


def shape_kwargs(kv, tied, bias, vocab):
    return dict(num_key_value_heads=kv, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias,
                vocab_size=vocab)


def logits(model, idx=IDX) -> np.ndarray:
    return np.asarray(model(jnp.asarray(idx))[0])


def hf_logits(hf, idx=IDX) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.as_tensor(idx)).logits.numpy()


def params(model) -> dict:
    return {k: np.asarray(v) for k, v in flatten_dict(nnx.state(model, nnx.Param).to_pure_dict()).items()}


def assert_same_state_dicts(a, b):
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    assert [k for k in pa if not np.array_equal(pa[k], pb[k])] == []


# ---------------------------------------------------------------- parity and round trips


@pytest.mark.gpu
@pytest.mark.parametrize("kv,tied,bias,vocab", SHAPES)
def test_logits_match_hf_and_round_trip_is_bit_identical(make_hf_llama, kv, tied, bias, vocab):
    hf = make_hf_llama(**shape_kwargs(kv, tied, bias, vocab))
    model = torch_bridge.from_hf(hf)
    c = model.config
    assert (c.norm, c.mlp, c.positions, c.n_kv_head, c.tie_embeddings, c.bias) == (
        "rmsnorm", "swiglu", "rope", kv, tied, bias)
    assert (c.mlp_dim, c.layer_norm_epsilon, c.vocab_size, c.n_valid_vocab) == (176, 1e-6, 128, vocab)
    diff = np.abs(logits(model)[..., :vocab] - hf_logits(hf)).max()
    print(f"\n[Llama kv={kv} tied={tied} bias={bias} vocab={vocab}] max |logits - HF logits| = {diff:.3g}")
    assert diff <= 1e-4
    back = torch_bridge.to_hf(model)
    assert isinstance(back, transformers.LlamaForCausalLM) and not back.training
    assert back.config.num_key_value_heads == kv and back.config.tie_word_embeddings == tied
    assert_same_state_dicts(hf.state_dict(), back.state_dict())


def test_scan_layers_import_gives_the_same_logits_and_round_trips(make_hf_llama):
    hf = make_hf_llama()
    scanned = torch_bridge.from_hf(hf, scan_layers=True)
    assert scanned.config.scan_layers
    np.testing.assert_allclose(logits(scanned), logits(torch_bridge.from_hf(hf)), atol=1e-6, rtol=0)
    assert_same_state_dicts(hf.state_dict(), torch_bridge.to_hf(scanned).state_dict())


@pytest.mark.gpu
def test_lm_loss_matches_hf(make_hf_llama):
    hf = make_hf_llama()
    with torch.no_grad():  # HF shifts the labels itself
        theirs = hf(torch.as_tensor(IDX), labels=torch.as_tensor(IDX)).loss.item()
    ours = float(cross_entropy(torch_bridge.from_hf(hf)(jnp.asarray(IDX[:, :-1]))[0], jnp.asarray(IDX[:, 1:])))
    print(f"\n[Llama] LM loss {ours:.6f}, HF {theirs:.6f}, |diff| = {abs(ours - theirs):.3g}")
    assert abs(ours - theirs) <= 1e-5


@pytest.mark.gpu
def test_greedy_generation_matches_hf_generate(make_hf_llama):
    # a wide init and scaled norms put greedy choices far from ties
    hf = make_hf_llama(seed=1, perturb=0.5, initializer_range=0.3)
    model = torch_bridge.from_hf(hf)
    expected, margins = [], []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=64, eos_token_id=None, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
        expected.append(out.sequences[0, len(prompt):].tolist())
        margins += [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    print(f"\n[Llama greedy] smallest top-2 logit margin on HF's path: {min(margins):.3g}")
    assert [len(e) for e in expected] == [64, 64] and min(margins) > 1e-3
    assert generate.generate(model, PROMPTS, max_new_tokens=64, temperature=0.0) == expected
    assert [generate.generate(model, [p], max_new_tokens=64, temperature=0.0)[0] for p in PROMPTS] == expected


# ---------------------------------------------------------------- directories, state dicts, the CLI


def test_save_hf_writes_a_llama_that_from_pretrained_loads(tmp_path, make_hf_llama):
    hf = make_hf_llama(tie_word_embeddings=True)
    model = torch_bridge.from_hf(hf)
    with pytest.warns(UserWarning, match="no tokenizer written"):
        torch_bridge.save_hf(model, str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        saved = json.load(f)
    assert (saved["model_type"], saved["rope_parameters"]["rope_type"], saved["bos_token_id"]) == ("llama", "default",
                                                                                                  None)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert np.abs(logits(model)[..., :100] - hf_logits(loaded)).max() <= 1e-4
    assert_same_params(torch_bridge.from_hf(tmp_path / "hf"), model)


def test_save_hf_of_a_gpt2_vocabulary_llama_is_a_complete_pipeline(tmp_path, make_hf_llama):
    """GPT-2's vocabulary: bos/eos are its 50256 and the GPT-2 tokenizer is written, so a text-generation
    pipeline loads the directory and its greedy tokens are jaxgpt's."""
    eot = tokenizer.GPT2_VOCAB_SIZE - 1
    model = torch_bridge.from_hf(make_hf_llama(vocab_size=50257, initializer_range=0.3, perturb=0.5))
    out = torch_bridge.save_hf(model, str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        saved = json.load(f)
    assert (saved["model_type"], saved["bos_token_id"], saved["eos_token_id"]) == ("llama", eot, eot)
    pipe = transformers.pipeline("text-generation", model=out)
    prompt = pipe.tokenizer("The quick brown fox")["input_ids"]
    assert prompt == tokenizer.get_tokenizer("gpt2").encode("The quick brown fox")
    theirs = pipe("The quick brown fox", do_sample=False, max_new_tokens=16, return_tensors=True)[0]
    ours = generate.generate(model, [prompt], max_new_tokens=16, temperature=0.0, eot_id=eot)[0]
    assert generate._until_eot(theirs["generated_token_ids"][len(prompt):], eot) == ours


def test_from_hf_reads_sharded_safetensors(tmp_path, make_hf_llama):
    hf = make_hf_llama()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert_same_params(torch_bridge.from_hf(tmp_path), torch_bridge.from_hf(hf))


@pytest.mark.parametrize("tied", [False, True])
def test_bare_state_dict_is_detected_and_needs_n_head(make_hf_llama, tied):
    hf = make_hf_llama(tie_word_embeddings=tied)
    with pytest.raises(ValueError, match="Llama state dict does not tell n_head: pass n_head"):
        torch_bridge.from_hf(hf.state_dict())
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}  # LlamaModel keys work too
    model = torch_bridge.from_hf(sd, n_head=4, block_size=128)  # RoPE leaves no trace of block_size
    assert model.config == torch_bridge.from_hf(hf).config
    assert_same_params(model, torch_bridge.from_hf(hf))


def test_a_mis_shaped_llama_state_dict_names_the_key_and_the_expected_shape(make_hf_llama):
    sd = dict(make_hf_llama().state_dict())  # layer 0 says 2 key/value heads, layer 1 has 4
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"(?s)n_kv_head=2.*missing keys: \['model.layers.1.mlp.up_proj.weight'\]"
                                         r".*layers.1.self_attn.k_proj.weight: got \(64, 64\), expected \(32, 64\)"):
        torch_bridge.from_hf(sd, n_head=4)


def test_cli_import_detects_llama(tmp_path, make_hf_llama):
    hf = make_hf_llama()
    hf.save_pretrained(tmp_path / "hf")
    cli_main(["import", "--from", f"hf:{tmp_path / 'hf'}", "--out", str(tmp_path / "jaxgpt")])
    config = checkpoint.read_config(str(tmp_path / "jaxgpt"))
    assert (config.norm, config.positions, config.n_kv_head, config.tie_embeddings) == ("rmsnorm", "rope", 2, False)
    assert_same_params(checkpoint.load_model(str(tmp_path / "jaxgpt")), torch_bridge.from_hf(hf))


# ---------------------------------------------------------------- refusals


LLAMA_SHAPED = dict(vocab_size=128, valid_vocab_size=100, block_size=64, n_layer=2, n_head=4, n_embd=64,
                    norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_head=2, bias=False)


def test_a_gpt2_shaped_model_is_not_llama():
    model = build(GPTConfig(vocab_size=128, valid_vocab_size=100, block_size=64, n_layer=2, n_head=4, n_embd=64))
    with pytest.raises(ValueError, match=r"Llama cannot express.*norm='layernorm'.*mlp='gelu'.*positions='learned'"
                                         r".*n_kv_head=0.*set model.n_kv_head=n_head"):
        convert.state_dict(model, LLAMA)
    assert isinstance(torch_bridge.to_hf(model), transformers.GPT2LMHeadModel)  # to_hf picks GPT-2 for it


def test_a_model_no_format_expresses_is_refused_naming_the_fields(tmp_path):
    neither = build(GPTConfig(**{**LLAMA_SHAPED, "positions": "learned"}))
    with pytest.raises(ValueError, match=r"no Hugging Face format.*Llama, positions='learned'.*GPT-2, norm='rmsnorm'"):
        torch_bridge.to_hf(neither)
    fused = build(GPTConfig(**{**LLAMA_SHAPED, "n_kv_head": 0}))
    with pytest.raises(ValueError, match="n_kv_head=0.*set model.n_kv_head=n_head for plain multi-head attention"):
        torch_bridge.to_hf(fused)
    with pytest.raises(ValueError, match="nanoGPT GPT-2 cannot express.*norm='rmsnorm'"):
        torch_bridge.to_nanogpt(build(GPTConfig(**LLAMA_SHAPED)), str(tmp_path / "ckpt.pt"))
    assert not os.path.exists(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("variant,named", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
     r"rope_parameters.rope_type='linear' \(expected 'default'\)"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' \(expected 'silu'\)"),
    (dict(head_dim=32), "head_dim=32, but jaxgpt's head size is n_embd // n_head = 16"),
    (dict(attention_bias=True), "attention_bias=True, mlp_bias=False differ"),
])
def test_llama_variants_jaxgpt_does_not_implement_are_refused(make_hf_llama, variant, named):
    with pytest.raises(ValueError, match=named):
        torch_bridge.from_hf(make_hf_llama(**variant))


def test_rope_theta_is_read_and_written(make_hf_llama):
    hf = make_hf_llama(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    model = torch_bridge.from_hf(hf)
    assert model.config.rope_theta == 500000.0
    assert np.abs(logits(model)[..., :100] - hf_logits(hf)).max() <= 1e-4
    assert torch_bridge.to_hf(model).config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}


def test_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type is 'mistral', expected one of \\['gpt2', 'llama'\\]"):
        torch_bridge.from_hf(tmp_path)
