"""A seconds-long model for tests and smoke runs: 2L/2H/32 on whatever data.dir holds."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.n_layer, c.model.n_head, c.model.n_embd = 2, 2, 32
    c.model.block_size = 32
    c.batch_size = 8
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 5
    c.max_steps = 20
    c.eval_every = 10
    c.eval_iters = 2
    c.log_every = 5
    c.sample_tokens = 16
    c.progress_bar = False
    return c
