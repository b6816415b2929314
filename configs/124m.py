"""GPT-2 124M on FineWeb-Edu with build-nanogpt's recipe: 524,288 tokens per step (64 x 1024 x 8), 19,073 steps."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "gpt2"
    c.model.dtype = "bfloat16"
    c.data.dir = "data/fineweb_edu"
    c.data.dataset = "fineweb_edu"
    c.data.tokenizer = "gpt2"
    c.batch_size = 64
    c.grad_accum_steps = 8
    c.optim.lr = 6e-4
    c.optim.warmup_steps = 715
    c.optim.warmup = "build_nanogpt"
    c.optim.weight_decay = 0.1
    c.max_steps = 19073
    c.eval_every = 250
    c.eval_iters = 20
    c.sample_prompt = "Hello, I'm a language model,"
    c.sample_tokens = 32
    return c
