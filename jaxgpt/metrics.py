"""Where training metrics go: metrics.jsonl, TensorBoard event files and (optionally) Weights & Biases.

Only process 0 writes. Also the FLOPs arithmetic behind MFU.
"""
from __future__ import annotations

import json
import os

import jax

PEAK_BF16_FLOPS = {  # device_kind substring -> dense bf16 FLOP/s of one device (vendor datasheets)
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
    "V100": 125e12, "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v4": 275e12,
}


def peak_flops_per_device(configured: float) -> float | None:
    """The configured figure, else a datasheet default for known accelerators, else None (no MFU)."""
    if configured:
        return configured
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in kind.lower()), None)


def flops_per_token(n_params: int, n_position_params: int, n_layer: int, block_size: int, n_embd: int) -> float:
    """Training FLOPs per token as in nanoGPT/PaLM: 6N (N without position embeddings) + attention 12*L*T*d."""
    return 6 * (n_params - n_position_params) + 12 * n_layer * block_size * n_embd


class MetricWriter:
    def __init__(self, workdir: str, config, enabled: bool):
        self.enabled = enabled
        self.jsonl = self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if config.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(f"wandb_project={config.wandb_project!r} is set but wandb is not installed: "
                                  "pip install wandb, or unset --config.wandb_project") from e
            self.wandb = wandb.init(project=config.wandb_project, config=config.to_dict(), dir=workdir)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()
