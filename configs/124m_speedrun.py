"""GPT-2 124M on FineWeb-Edu with the speedrun's recipe (modded-nanogpt, records of Nov-Dec 2024): Muon on the
hidden matrices, AdamW on embeddings, head and scalars; rotary positions, RMSNorm without biases, QK-norm, ReLU^2,
logits soft-capped at 30, zero-initialised projections and head, an untied head, 3 value embeddings; a trapezoid
schedule (no warmup, constant, the last 40% a line down). 524,288 tokens per step as configs/124m.py.

Tokens it is meant to need: 3,200 steps, 1.68B tokens, against configs/124m.py's 19,073 steps (10B tokens). That is
the budget of modded-nanogpt's record 9 (2024-11-06, 3,200 steps of 8 x 64 x 1024 tokens to 3.28 FineWeb val loss,
records/track_1_short/2024-11-06_ShortcutsTweaks), whose blocks these are, less its embedding skip connections and
value residual (value embeddings, from the December records, stand in for the latter). Measured on a GPU: nothing
yet (bench/RESULTS.md); the learning rates are the record's, translated where jaxgpt's parametrisation differs."""
import importlib


def get_config():
    c = importlib.import_module("configs.124m").get_config()
    m = c.model
    m.positions, m.norm, m.bias = "rope", "rmsnorm", False
    m.qk_norm = True
    m.mlp = "relu2"
    m.logit_softcap = 30.0
    m.zero_init_proj = True
    m.tie_embeddings = False
    m.value_embeds = 3  # layers 0-2 and 9-11, as modded-nanogpt's 2024-12-17 record
    o = c.optim
    o.name = "muon"
    o.muon_lr, o.muon_momentum = 0.02, 0.95  # the record's Muon
    # Its Adam: wte 0.3 (an N(0, 1) table), head 0.002 (from 0), scalars 0.02, betas (0.9, 0.95), no decay. jaxgpt's
    # tables start at N(0, 0.02) and feed the residual stream unnormalised: their lr keeps the record's step relative
    # to the table's scale, 0.3 x 0.02.
    o.embed_lr, o.head_lr, o.lr = 6e-3, 2e-3, 2e-2
    o.b1, o.b2, o.weight_decay, o.grad_clip = 0.9, 0.95, 0.0, 0.0
    o.schedule, o.warmup_steps, o.cooldown_frac = "trapezoid", 0, 0.4
    o.min_lr_ratio = 0.0  # the record cools down to 0
    c.max_steps = 3200
    o.decay_steps = 0
    return c
