"""The CPU recipe's data and model size with the speedrun's optimizer, blocks and schedule: Muon, rotary positions,
QK-norm, value embeddings, a trapezoid schedule, 24 x 64 tokens per step, 200 steps, one evaluation at the end.
It reaches the CPU recipe's val loss in a fraction of its wall time (figures: bench/RESULTS.md, from
`python -m bench.train_cpu`)."""
import importlib


def get_config():
    c = importlib.import_module("configs.shakespeare_char_cpu").get_config()
    m = c.model
    m.positions = "rope"
    m.qk_norm = True
    m.value_embeds = 2  # layers 0, 1 and again 2, 3 (of 4)
    m.mlp = "relu2"
    c.batch_size = 24  # Muon's orthogonalisation costs the same per step whatever the batch: fewer, larger steps
    c.eval_iters = 10  # x 24 windows: the 240 windows the CPU recipe's 20 x 12 evaluate
    c.max_steps = 200
    c.eval_every = 200  # one evaluation, at the end
    c.optim.name = "muon"
    c.optim.muon_lr = 0.02
    c.optim.lr = 3e-3  # AdamW's, on the embeddings, norms and biases
    c.optim.schedule = "trapezoid"
    c.optim.warmup_steps = 20
    c.optim.decay_steps = 200
    c.optim.cooldown_frac = 0.4
    c.steps_per_call = 50
    return c
