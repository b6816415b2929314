"""jaxgpt: GPT-2 in JAX/Flax NNX. See README.md."""
