"""The one config schema: every field, its default and what it means. Other configs override a few fields.

Any field can be overridden on the command line: `--config.optim.lr=3e-4`. Fields set to None here are
optional (a placeholder keeps their type open for overrides).
"""
from ml_collections import ConfigDict, FieldReference


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0  # one seed for parameter init, dropout and data order

    c.model = ConfigDict()
    c.model.preset = ""  # "", gpt2, gpt2-medium, gpt2-large, gpt2-xl: sets n_layer/n_head/n_embd
    c.model.n_layer = 12  # transformer blocks
    c.model.n_head = 12  # attention heads per block
    c.model.n_embd = 768  # residual stream width
    c.model.block_size = 1024  # context length T
    c.model.vocab_size = 0  # embedding rows; 0: the tokenizer's vocabulary padded up to a multiple of 64
    c.model.dropout = 0.0  # dropout on embeddings and residual branches (0 for pretraining, 0.1+ for finetuning)
    c.model.bias = True  # biases in Linear and LayerNorm layers (GPT-2: True)
    c.model.activation = "gelu_tanh"  # the MLP's GELU: gelu_tanh (GPT-2's) | gelu (exact erf, nanoGPT's)
    c.model.norm = "layernorm"  # layernorm (GPT-2) | rmsnorm
    c.model.mlp = "gelu"  # gelu (GPT-2) | swiglu (gate, up and down projections, as Llama) | relu2 (relu(x)^2)
    c.model.mlp_hidden = 0  # the MLP's width; 0: 4 * n_embd (gelu, relu2) or 8/3 * n_embd rounded up to 256 (swiglu)
    c.model.positions = "learned"  # learned (GPT-2's wpe) | rope (rotary)
    c.model.rope_theta = 10000.0  # rotary base
    c.model.n_kv_head = 0  # 0: GPT-2's fused c_attn; n: separate q/k/v with n key/value heads (grouped-query)
    c.model.tie_embeddings = True  # the head shares wte (GPT-2); False: its own lm_head
    c.model.qk_norm = False  # RMS-normalise queries and keys per head (no scale) before attention
    c.model.logit_softcap = 0.0  # >0: logits = cap * tanh(logits / cap) (modded-nanogpt: 30, later 15)
    c.model.zero_init_proj = False  # attn.c_proj, mlp.c_proj and an untied lm_head start at 0 (GPT-2: small normal)
    c.model.value_embeds = 0  # n extra embedding tables mixed into the values of the first n and last n layers
    c.model.layer_norm_epsilon = 1e-5  # the norms' epsilon (GPT-2 1e-5, Llama 1e-6)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16 (parameters stay float32; fp16 trains
    # under optim.loss_scale)
    # float32 matmuls on a GPU: default (XLA's: TF32, or JAX_DEFAULT_MATMUL_PRECISION) | high (bf16x3) | highest
    # (full float32); on a CPU all three are float32
    c.model.matmul_precision = "default"
    c.model.scan_layers = False  # compile one block and lax.scan over the layers (faster compiles for big models)
    c.model.remat = "none"  # activation checkpointing per block: none | full | dots
    c.model.attention = "auto"  # auto | blocked | xla | cudnn: the attention implementation (jaxgpt/ops)
    c.model.kernels = "fast"  # fast | gpu | reference: the kernel set (gpu: a GPU candidate; reference: plain jnp)
    c.model.loss_chunk = 4096  # tokens per device whose float32 logits the loss holds at once; 0: all of them

    c.lora = ConfigDict()
    c.lora.rank = 0  # >0: train only low-rank adapters (nnx.LoRAParam) beside the targets' kernels
    c.lora.alpha = 16.0  # the adapters add (alpha / rank) * x @ A @ B
    c.lora.targets = "attn"  # comma list: attn (c_attn or q/k/v, attn.c_proj), mlp (c_fc, c_gate, mlp.c_proj)
    c.lora.dropout = 0.0  # dropout on the adapters' input, in training

    c.data = ConfigDict()
    c.data.dir = "data/shakespeare_char"  # prepared shards (train_*.bin, val_*.bin, tokenizer.json)
    c.data.dataset = "auto"  # when dir is empty, prepare it from: auto | tinyshakespeare | stdlib_docs | text
    c.data.input = ""  # local text file or glob used by dataset=text (and auto, when given)
    c.data.tokenizer = "char"  # tokenizer used when preparing: char | gpt2 | bpe (trained on the data)
    c.data.vocab_size = 0  # bpe: its vocabulary size (257..65536)

    c.batch_size = 12  # sequences per micro-batch, summed over all devices and hosts (see device_batch_size)
    c.grad_accum_steps = 1  # micro-batches per optimizer step (tokens/step = batch_size * block_size * this)
    c.device_batch_size = 0  # >0: sequences per device per micro-batch; sets batch_size for the mesh it runs on
    c.tokens_per_step = 0  # >0: tokens per optimizer step; sets grad_accum_steps = this / (batch_size * block_size)
    c.steps_per_call = 1  # optimizer steps per jitted call (a lax.scan); >1 amortises the per-call cost of small models

    c.optim = ConfigDict()
    c.optim.name = "adamw"  # adamw | muon (Muon on the hidden matrices, AdamW on embeddings, head, norms, biases)
    c.optim.lr = 6e-4  # peak learning rate, reached after warmup_steps (muon: that of the norms and biases)
    c.optim.schedule = "cosine"  # cosine (nanoGPT's) | trapezoid (warmup, constant, linear cool-down)
    c.optim.cooldown_frac = 0.4  # trapezoid: the last fraction of decay_steps that falls linearly to the end lr
    c.optim.min_lr_ratio = 0.1  # the schedule ends at lr * min_lr_ratio
    c.optim.warmup_steps = 100  # steps of linear warmup to lr, in the form `warmup` picks
    c.optim.warmup = "nanogpt"  # nanogpt: lr*(s+1)/(warmup_steps+1) at step s | build_nanogpt: lr*(s+1)/warmup_steps
    c.optim.decay_steps = 0  # steps of warmup + cosine decay; 0: max_steps
    c.optim.weight_decay = 0.1  # AdamW decay of the weights of 2+ dims only (as nanoGPT; muon: embeddings and head)
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.95  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.grad_clip = 1.0  # clip by global norm; 0 disables
    # float16's loss scale: auto (dynamic for float16, none otherwise) | dynamic | none | a fixed number
    c.optim.loss_scale = "auto"
    c.optim.loss_scale_period = 2000  # dynamic: finite steps in a row before the scale doubles (it halves on overflow)
    c.optim.muon_lr = 0.02  # muon: peak learning rate of the hidden matrices
    c.optim.muon_momentum = 0.95  # muon: momentum of its buffer
    c.optim.muon_nesterov = True  # muon: orthogonalise the Nesterov step (True) or the buffer
    c.optim.ns_steps = 5  # muon: Newton-Schulz iterations
    c.optim.muon_weight_decay = 0.0  # muon: decoupled decay of the hidden matrices (times muon_lr)
    c.optim.embed_lr = 0.0  # muon: AdamW's peak lr of wte, wpe and the value embeddings; 0: lr
    c.optim.head_lr = 0.0  # muon: AdamW's peak lr of an untied lm_head; 0: lr

    c.max_steps = 5000  # optimizer steps to train for
    c.eval_every = 500  # steps between evaluations (val loss, sample, checkpoint)
    c.eval_iters = 20  # batches of batch_size averaged for the val loss
    c.log_every = 10  # steps between log lines
    c.checkpoint_every = FieldReference(0)  # steps between checkpoints; 0: every eval
    c.keep_checkpoints = 2  # latest checkpoints kept (the best by val loss is kept too)
    c.init_from = "scratch"  # scratch | resume | hf:DIR | nanogpt:FILE | openai:DIR | ckpt:DIR (a jaxgpt model dir)
    c.resume_step = 0  # >0: resume from this step, not the latest (later ones move to WORKDIR/set_aside/; run again,
    # the same command goes on from what it wrote since)
    c.sample_prompt = "\n"  # prompt of the text sample printed at every eval
    c.sample_tokens = 200  # tokens in that sample; 0 disables it
    c.hellaswag_file = ""  # HellaSwag val .jsonl scored at every eval when set (GPT-2 BPE models)
    c.hellaswag_limit = 0  # examples scored from it; 0: all

    c.mesh = ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1: all devices left over
    c.mesh.fsdp = 1  # parameter/optimizer-state sharding axis size
    c.mesh.tensor = 1  # tensor-parallel axis size (heads, mlp, vocab)

    c.peak_flops = 0.0  # peak FLOP/s of one device for MFU; 0: a default for known devices
    c.wandb_project = ""  # log to Weights & Biases under this project when set and wandb is installed
    c.progress_bar = True  # tqdm progress bar with ETA on process 0
    return c
