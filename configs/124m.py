"""GPT-2 124M on FineWeb-Edu with build-nanogpt's recipe: 524,288 tokens per step, 19,073 steps. The same file runs
on 1 device or 8: gradient accumulation makes up the tokens the devices' micro-batches do not cover."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "gpt2"
    c.model.dtype = "bfloat16"
    c.data.dir = "data/fineweb_edu"
    c.data.dataset = "fineweb_edu"
    c.data.tokenizer = "gpt2"
    c.tokens_per_step = 524288  # 2**19
    c.device_batch_size = 32  # x 1024 tokens: what fits an 80 GB GPU in bf16 (docs/scaling.md)
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
