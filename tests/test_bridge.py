"""torch_bridge: bit-exact round trips, the nanoGPT layout, strict key checks, unsafe pickles and the CLI."""
import dataclasses
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from flax.traverse_util import flatten_dict
from nanogpt_reference import GPT as NanoGPT
from nanogpt_reference import GPTConfig as NanoGPTConfig

import torch_bridge
from jaxgpt.model import GPTConfig, build
from torch_bridge.__main__ import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(vocab_size=128, valid_vocab_size=100, block_size=64, n_layer=2, n_head=4, n_embd=64)
IDX = np.random.default_rng(0).integers(0, 96, (2, 24))  # tokens valid in every small vocab here


def random_model(seed: int = 1, **config):
    """A jaxgpt model whose every parameter (biases, LayerNorm scales, padded rows) is non-trivial."""
    model = build(GPTConfig(**{**SMALL, **config}), seed)
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    return model


def params(model) -> dict:
    return {k: np.asarray(v) for k, v in flatten_dict(nnx.state(model, nnx.Param).to_pure_dict()).items()}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    assert [k for k in pa if pa[k].dtype != pb[k].dtype or not np.array_equal(pa[k], pb[k])] == []


def logits(model, idx=IDX) -> np.ndarray:
    return np.asarray(model(jnp.asarray(idx))[0])


def torch_logits(module, idx=IDX) -> np.ndarray:
    with torch.no_grad():
        out = module(torch.as_tensor(idx))
    return (out.logits if hasattr(out, "logits") else out).numpy()


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("scan_layers", [False, True])
def test_hf_to_jaxgpt_to_hf_is_bit_identical(make_hf_gpt2, scan_layers):
    hf = make_hf_gpt2()
    back = torch_bridge.to_hf(torch_bridge.from_hf(hf, scan_layers=scan_layers))
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not back.training


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_jaxgpt_to_nanogpt_to_jaxgpt_is_bit_identical(tmp_path, scan_layers, bias):
    model = random_model(bias=bias, scan_layers=scan_layers, activation="gelu")
    back = torch_bridge.from_nanogpt(torch_bridge.to_nanogpt(model, tmp_path / "ckpt.pt"), scan_layers=scan_layers)
    assert back.config == model.config
    assert_same_params(back, model)


def test_save_hf_loads_with_from_pretrained_and_logits_match(tmp_path):
    model = random_model()
    torch_bridge.save_hf(model, tmp_path / "hf")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "hf"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.vocab_size == 100  # padded rows dropped
    diff = np.abs(logits(model)[..., :100] - torch_logits(hf)).max()
    print(f"\n[save_hf -> from_pretrained] max |logits - HF logits| = {diff:.3g}")
    assert diff <= 1e-4
    back = torch_bridge.from_hf(tmp_path / "hf")  # and back through the directory reader
    np.testing.assert_array_equal(logits(back), logits(model))


def test_from_hf_reads_pytorch_model_bin_with_gpt2model_keys_and_buffers(tmp_path, make_hf_gpt2):
    """The hub's original gpt2 files: GPT2Model keys without 'transformer.', causal-mask buffers, no lm_head."""
    hf = make_hf_gpt2()
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        sd[f"h.{i}.attn.bias"], sd[f"h.{i}.attn.masked_bias"] = torch.ones(1, 1, 128, 128), torch.tensor(-1e4)
    hf.config.save_pretrained(tmp_path)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert_same_params(torch_bridge.from_hf(tmp_path), torch_bridge.from_hf(hf))


def test_bare_state_dict_infers_the_shape_and_needs_n_head_off_preset(make_hf_gpt2):
    hf = make_hf_gpt2()
    with pytest.raises(ValueError, match="n_embd=64 matches no GPT-2 preset.*pass n_head"):
        torch_bridge.from_hf(hf.state_dict())
    model = torch_bridge.from_hf(hf.state_dict(), n_head=4)
    assert model.config == torch_bridge.from_hf(hf).config
    assert_same_params(model, torch_bridge.from_hf(hf))


# ---------------------------------------------------------------- nanoGPT


@pytest.mark.parametrize("bias", [True, False])
def test_to_nanogpt_loads_strictly_into_nanogpt_and_logits_match(tmp_path, bias):
    model = random_model(bias=bias, activation="gelu")
    ckpt = torch.load(torch_bridge.to_nanogpt(model, tmp_path / "ckpt.pt"), weights_only=True)
    assert ckpt["model_args"] == dict(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=bias, vocab_size=128,
                                      dropout=0.0)
    reference = NanoGPT(NanoGPTConfig(**ckpt["model_args"])).eval()
    reference.load_state_dict(ckpt["model"], strict=True)
    diff = np.abs(logits(model)[..., :100] - torch_logits(reference)[..., :100]).max()
    print(f"\n[to_nanogpt, bias={bias}] max |logits - nanoGPT logits| = {diff:.3g}")
    assert diff <= 1e-4


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_from_nanogpt_imports_nanogpt_checkpoints(tmp_path, bias, compiled):
    torch.manual_seed(0)
    reference = NanoGPT(NanoGPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=4, n_embd=64, bias=bias)).eval()
    prefix = "_orig_mod." if compiled else ""  # what torch.compile'd models save
    ckpt = {"model": {prefix + k: v for k, v in reference.state_dict().items()}, "iter_num": 5000,
            "model_args": dataclasses.asdict(reference.config), "best_val_loss": torch.tensor(3.0), "config": {}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    model = torch_bridge.from_nanogpt(tmp_path / "ckpt.pt")
    assert (model.config.bias, model.config.vocab_size, model.config.n_valid_vocab) == (bias, 96, 96)
    assert np.abs(logits(model) - torch_logits(reference)).max() <= 1e-4


def test_imported_weights_do_not_share_memory_with_the_torch_tensors():
    torch.manual_seed(0)
    reference = NanoGPT(NanoGPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    model = torch_bridge.from_nanogpt({"model": reference.state_dict(),
                                       "model_args": dataclasses.asdict(reference.config)})
    before = {k: v.copy() for k, v in params(model).items()}  # np.asarray of a CPU jax array is a view
    with torch.no_grad():  # what a PyTorch training step does to its parameters
        for p in reference.parameters():
            p.add_(1.0)
    assert all(np.array_equal(before[k], v) for k, v in params(model).items())


def test_nanogpt_checkpoint_with_large_weights_imports_the_exact_gelu(tmp_path):
    """c_fc weights x8 put the MLP's pre-activations where the two GELUs part (|x| of 1-3), the embedding x10
    makes the logits ~12 so that shows: the import computes nanoGPT's exact GELU, within 1e-5 of its forward
    (measured 3.8e-6), where the tanh form is visibly off (measured 7.6e-4)."""
    torch.manual_seed(0)
    reference = NanoGPT(NanoGPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=4, n_embd=64)).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.mul_(8.0 if name.endswith("c_fc.weight") else 10.0 if name.endswith("wte.weight") else 1.0)
    torch.save({"model": reference.state_dict(), "model_args": dataclasses.asdict(reference.config)},
               tmp_path / "ckpt.pt")
    model = torch_bridge.from_nanogpt(tmp_path / "ckpt.pt")
    tanh = torch_bridge.from_nanogpt(tmp_path / "ckpt.pt", activation="gelu_tanh")
    theirs = torch_logits(reference)
    exact_diff, tanh_diff = (np.abs(logits(m) - theirs).max() for m in (model, tanh))
    print(f"\n[nanoGPT, large weights] max |logits - nanoGPT| exact GELU {exact_diff:.3g}, tanh GELU {tanh_diff:.3g}")
    assert model.config.activation == "gelu" and exact_diff <= 1e-5 and tanh_diff > 3e-4


def test_activation_round_trips_through_hf_and_warns_for_nanogpt(tmp_path, make_hf_gpt2):
    exact_hf = make_hf_gpt2(activation_function="gelu")
    model = torch_bridge.from_hf(exact_hf)
    assert model.config.activation == "gelu" and torch_bridge.from_hf(make_hf_gpt2()).config.activation == "gelu_tanh"
    assert np.abs(logits(model)[..., :100] - torch_logits(exact_hf)).max() <= 1e-4
    back = torch_bridge.to_hf(model)
    assert back.config.activation_function == "gelu"
    assert all(torch.equal(a, b) for a, b in zip(exact_hf.state_dict().values(), back.state_dict().values()))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        torch_bridge.from_hf(make_hf_gpt2(activation_function="relu"))
    with pytest.warns(UserWarning, match="nanoGPT computes the exact GELU"):
        torch_bridge.to_nanogpt(random_model(), tmp_path / "ckpt.pt")


def test_nanogpt_vocab_50304_is_gpt2_padded():
    torch.manual_seed(0)
    reference = NanoGPT(NanoGPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    model = torch_bridge.from_nanogpt({"model": reference.state_dict(), "model_args": vars(reference.config)})
    assert (model.config.vocab_size, model.config.valid_vocab_size) == (50304, 50257)
    ours, theirs = logits(model), torch_logits(reference)
    assert np.abs(ours[..., :50257] - theirs[..., :50257]).max() <= 1e-4
    assert np.all(np.isneginf(ours[..., 50257:]))


# ---------------------------------------------------------------- bad inputs


MISSING, EXTRA, MISSHAPED = "transformer.h.1.mlp.c_fc.bias", "transformer.h.0.attn.extra", "transformer.ln_f.weight"
BREAKAGES = {
    "missing": lambda sd: sd.pop(MISSING),
    "unexpected": lambda sd: sd.update({EXTRA: torch.zeros(3)}),
    "wrong shape": lambda sd: sd.update({MISSHAPED: torch.zeros(65)}),
    "untied head": lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"] + 1}),
}
NAMED = {"missing": MISSING, "unexpected": EXTRA, "wrong shape": MISSHAPED, "untied head": "lm_head.weight"}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_bad_state_dict_raises_value_error_naming_the_key(make_hf_gpt2, breakage):
    sd = dict(make_hf_gpt2().state_dict())
    BREAKAGES[breakage](sd)
    with pytest.raises(ValueError, match=rf"{breakage}[^\n]*{NAMED[breakage]}"):
        torch_bridge.from_hf(sd, n_head=4)


def test_all_problems_are_listed_in_one_error(make_hf_gpt2):
    sd = dict(make_hf_gpt2().state_dict())
    for breakage in ("missing", "unexpected", "wrong shape"):
        BREAKAGES[breakage](sd)
    with pytest.raises(ValueError) as error:
        torch_bridge.from_hf(sd, n_head=4)
    assert all(key in str(error.value) for key in (MISSING, EXTRA, MISSHAPED, "(65,)", "expected (64,)"))


def test_unsupported_hf_variant_is_refused(make_hf_gpt2):
    with pytest.raises(ValueError, match="activation_function.*relu"):
        torch_bridge.from_hf(make_hf_gpt2(activation_function="relu"))


@pytest.mark.parametrize("field, value", [("qk_norm", True), ("mlp", "relu2"), ("logit_softcap", 30.0),
                                          ("value_embeds", 1)])
def test_a_speedrun_block_is_refused_by_every_format_naming_the_field(tmp_path, field, value):
    """Neither GPT-2 (HF, nanoGPT) nor Llama has these blocks: exports refuse the model and name the field (and
    write nothing). Zero-initialised projections are an init, not a block: such a model exports as GPT-2."""
    model = build(GPTConfig(**SMALL, **{field: value}))
    named = f"{field}={value!r}"
    with pytest.raises(ValueError, match=rf"no Hugging Face format .* as Hugging Face GPT-2, {named} \(Hugging"):
        torch_bridge.to_hf(model)
    with pytest.raises(ValueError, match=rf"nanoGPT GPT-2 cannot express this model: {named}"):
        torch_bridge.to_nanogpt(model, str(tmp_path / "ckpt.pt"))
    assert not os.path.exists(tmp_path / "ckpt.pt")
    llama = build(GPTConfig(**SMALL, norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_head=2, bias=False,
                            **({field: value} if field != "mlp" else {})))
    if field != "mlp":  # a Llama but for this block
        with pytest.raises(ValueError, match=rf"Hugging Face Llama, {named} \(Hugging Face Llama has"):
            torch_bridge.to_hf(llama)
    zero = random_model(zero_init_proj=True)
    assert zero.config.zero_init_proj and isinstance(torch_bridge.to_hf(zero), transformers.GPT2LMHeadModel)


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_carries_code_is_refused(tmp_path):
    marker, path = tmp_path / "code_ran", tmp_path / "ckpt.pt"
    path.write_bytes(pickle.dumps({"model": RunsCode(f"touch {marker}")}))
    with pytest.raises(ValueError, match=rf"{path}: refusing to load.*never executes code"):
        torch_bridge.from_nanogpt(path)
    assert not marker.exists()
    with pytest.raises(SystemExit) as exit_info:  # the CLI reports it in one line and exits non-zero
        cli_main(["import", "--from", f"nanogpt:{path}", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1 and not marker.exists()


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize("spec", ["onnx:model.onnx", "hf", "nanogpt:"])
def test_cli_rejects_a_bad_spec(tmp_path, capsys, spec):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["import", "--from", spec, "--out", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    assert "expected hf:DIR, nanogpt:FILE or openai:DIR" in capsys.readouterr().err


def test_cli_round_trip_hf_dir_to_jaxgpt_to_nanogpt(tmp_path, make_hf_gpt2):
    hf = make_hf_gpt2()
    hf.save_pretrained(tmp_path / "hf")

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "torch_bridge", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert done.returncode == 0, done.stderr
    cli("import", "--from", f"hf:{tmp_path / 'hf'}", "--out", tmp_path / "jaxgpt")
    cli("export", "--ckpt", tmp_path / "jaxgpt", "--to", f"nanogpt:{tmp_path / 'ckpt.pt'}")
    back, direct = torch_bridge.from_nanogpt(tmp_path / "ckpt.pt"), torch_bridge.from_hf(hf)
    assert back.config == dataclasses.replace(direct.config, activation="gelu")  # nanoGPT's GELU is exact
    assert_same_params(back, direct)
