"""GPT-2 774M: the 124M recipe with the gpt2-large shape (learning rate as in the GPT-3 paper for this size)."""
import importlib


def get_config():
    c = importlib.import_module("configs.124m").get_config()
    c.model.preset = "gpt2-large"
    c.optim.lr = 2.5e-4
    c.model.scan_layers = True  # one compiled block instead of gpt2-large's many
    c.model.remat = "dots"  # keep matmul outputs, recompute the rest: fits the 524K-token step in memory
    return c
