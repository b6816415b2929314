"""Comparing the weights of two runs that computed the same math in another order (meshes, processes, frameworks):
what is signal and what is rounding noise.

Softmax ignores a shift shared by all keys, so with learned positions the key bias (the middle third of GPT-2's
fused c_attn bias) has a true gradient of 0. Both runs compute rounding noise there (~1e-9) that Adam divides by its
own square root: steps of up to lr in either direction, different in each run. Those entries are left out of weight
comparisons; they have no effect on the output, which a forward pass on fresh tokens checks instead.
"""
import re

import numpy as np


def zero_gradient_entries(name: str, shape) -> np.ndarray:
    """A boolean mask of the entries of the parameter `name` (any path spelling: 'h.0.attn.c_attn.bias',
    "['h'][0]['attn']['c_attn']['bias']") whose true gradient is 0: the key bias of a fused c_attn (3, H, D),
    stacked (L, 3, H, D) under scan_layers, or flat (3C,) as nanoGPT/HF store it."""
    mask = np.zeros(shape, bool)
    words = re.findall(r"[A-Za-z_]\w*", name)
    if words[-2:] == ["c_attn", "bias"]:
        if len(shape) >= 3:
            mask[..., 1, :, :] = True
        else:
            third = shape[-1] // 3
            mask[..., third:2 * third] = True
    return mask


def max_differences(a: dict, b: dict) -> dict[str, float]:
    """{name: max |a - b|} over the entries whose gradient is not pure noise; a and b map the same names."""
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    out = {}
    for name in a:
        x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
        assert x.shape == y.shape, (name, x.shape, y.shape)
        diff = np.where(zero_gradient_entries(name, x.shape), 0.0, np.abs(x - y))
        out[name] = float(diff.max()) if diff.size else 0.0
    return out


def assert_weights_close(a: dict, b: dict, atol: float):
    diffs = max_differences(a, b)
    worst = sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    assert worst[0][1] <= atol, worst


def flat(tree) -> dict:
    """{path string: array} of a nested dict of arrays (an nnx.State's pure dict)."""
    import jax
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
