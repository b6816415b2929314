"""nanoGPT's shakespeare_char: a 6L/6H/384 character model, T=256, B=64, 5000 steps (a GPU run of minutes)."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.n_layer, c.model.n_head, c.model.n_embd = 6, 6, 384
    c.model.block_size = 256
    c.model.dropout = 0.2
    c.data.dir = "data/shakespeare_char"
    c.data.dataset = "auto"
    c.data.tokenizer = "char"
    c.batch_size = 64
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.b2 = 0.99
    c.max_steps = 5000
    c.eval_every = 250
    c.eval_iters = 200
    c.sample_tokens = 500
    return c
