"""Shared fixtures: small random-init Hugging Face GPT-2 and Llama models (nothing is downloaded)."""
import importlib.util
import os

import jax
import pytest

# float32 means float32 in every test, on any backend: XLA runs a GPU's float32 matmuls in TF32 by default (the HF
# parity check was 1.9e-4 off on an H200). Models of matmul_precision=default (no setting of their own) follow it;
# the CLI tests' subprocesses read the variable.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
jax.config.update("jax_default_matmul_precision", "highest")

# These compare against PyTorch and Hugging Face: without torch installed, the other tests still run.
TORCH_TESTS = ["test_bridge.py", "test_evaluate.py", "test_generate.py", "test_hf_export.py", "test_llama.py",
               "test_model.py", "test_openai.py"]
collect_ignore = [] if importlib.util.find_spec("torch") else TORCH_TESTS

SMALL_HF = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=100, bos_token_id=0, eos_token_id=0)
SMALL_LLAMA = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, vocab_size=100, bos_token_id=None,
                   eos_token_id=None, pad_token_id=None)


def hf_gpt2(full_size: bool = False, seed: int = 0, **overrides):
    """A random GPT2LMHeadModel in eval mode, dropout off, eager attention (sdpa adds its own rounding).
    full_size: GPT2Config()'s 124M shape; otherwise the small SMALL_HF shape."""
    import torch  # here, so that tests that need no torch run without it
    import transformers
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**{**({} if full_size else SMALL_HF), **overrides},
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # HF initialises biases to 0 and LayerNorm scales to 1: make them non-trivial
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_llama(seed: int = 0, perturb: float = 0.1, **overrides):
    """A random LlamaForCausalLM (the SMALL_LLAMA shape) in eval mode, eager attention. HF initialises RMSNorm
    weights to 1 and biases to 0: `perturb` * N(0, 1) is added to them so that they matter."""
    import torch
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**SMALL_LLAMA, **overrides})
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(perturb * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def make_hf_gpt2():
    return hf_gpt2


@pytest.fixture(scope="session")
def make_hf_llama():
    return hf_llama
