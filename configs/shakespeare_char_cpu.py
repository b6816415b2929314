"""nanoGPT's CPU recipe for shakespeare_char: 4L/4H/128, T=64, B=12, 2000 steps."""
import importlib


def get_config():
    c = importlib.import_module("configs.shakespeare_char").get_config()
    c.model.n_layer, c.model.n_head, c.model.n_embd = 4, 4, 128
    c.model.block_size = 64
    c.model.dropout = 0.0
    c.batch_size = 12
    c.max_steps = 2000
    c.optim.decay_steps = 2000
    c.eval_every = 250
    c.eval_iters = 20
    c.sample_tokens = 300
    c.steps_per_call = 50  # a jitted call's fixed cost is large beside this small step on CPU
    return c
