"""A 1.1B GPT with the modern blocks: 24 layers, 12 heads, width 1536, T=1024, SwiGLU, rotary positions, RMSNorm,
an untied head, remat and scan, on GPT-2 BPE (FineWeb-Edu) with the 124M recipe's AdamW warmup-cosine."""
from configs import base


def get_config():
    c = base.get_config()
    m = c.model
    m.n_layer, m.n_head, m.n_embd, m.block_size = 24, 12, 1536, 1024
    m.norm, m.mlp, m.positions = "rmsnorm", "swiglu", "rope"
    m.mlp_hidden = 6144  # 4 x width: 1.06B parameters with the untied head
    m.n_kv_head = 12  # separate q/k/v projections (HF Llama's layout), every head its own keys and values
    m.tie_embeddings = False
    m.bias = False
    m.layer_norm_epsilon = 1e-6
    m.dtype = "bfloat16"
    m.scan_layers = True
    m.remat = "full"
    c.data.dir = "data/fineweb_edu"
    c.data.dataset = "fineweb_edu"
    c.data.tokenizer = "gpt2"
    c.tokens_per_step = 524288  # 2**19, as the 124M recipe
    c.device_batch_size = 8  # x 1024 tokens per device; remat keeps activations small
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 715
    c.optim.warmup = "build_nanogpt"
    c.max_steps = 19073
    c.eval_every = 250
    c.sample_prompt = "Hello, I'm a language model,"
    c.sample_tokens = 32
    return c
