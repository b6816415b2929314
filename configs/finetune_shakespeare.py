"""nanoGPT's finetune_shakespeare: GPT-2 weights finetuned on tinyshakespeare in GPT-2 BPE, a small constant
learning rate, a few hundred steps, dropout 0.1. Point init_from at a local Hugging Face GPT-2 directory:

    python -m jaxgpt.train --config=configs/finetune_shakespeare.py --workdir=out/finetune \
        --config.init_from=hf:path/to/gpt2 --config.data.input=path/to/input.txt
"""
from configs import base


def get_config():
    c = base.get_config()
    c.init_from = "hf:gpt2"  # a local HF directory (nothing is downloaded)
    c.model.block_size = 256  # crops the pretrained 1024 positions, as nanoGPT's crop_block_size
    c.model.dropout = 0.1
    c.data.dir = "data/shakespeare_gpt2"
    c.data.dataset = "tinyshakespeare"
    c.data.tokenizer = "gpt2"
    c.batch_size = 8
    c.grad_accum_steps = 4
    c.optim.lr = 3e-5
    c.optim.min_lr_ratio = 1.0  # constant: the cosine runs from lr to lr
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.max_steps = 300
    c.eval_every = 50
    c.eval_iters = 20
    c.sample_prompt = "ROMEO:"
    c.sample_tokens = 64
    return c
