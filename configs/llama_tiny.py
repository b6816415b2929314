"""tiny.py's size with the modern blocks (RMSNorm, SwiGLU, rotary positions, grouped-query attention): about as
many parameters as the GPT-2 tiny model, for tests and for comparing the two."""
from configs import tiny


def get_config():
    c = tiny.get_config()
    m = c.model
    m.norm, m.mlp, m.positions = "rmsnorm", "swiglu", "rope"
    m.n_kv_head = 1  # 2 query heads share one key/value head
    m.mlp_hidden = 96  # SwiGLU's three matrices at 3 x 32 x 96 about match GELU's two at 2 x 32 x 128
    m.bias = False
    m.layer_norm_epsilon = 1e-6
    return c
