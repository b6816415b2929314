"""LoRA finetuning: only the adapters train (and carry optimizer state), the base stays bit-identical, the initial
model is the base model, resume is exact, and exports merge the adapters."""
import importlib

import corpus
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

from jaxgpt import checkpoint, generate, loader, model, prepare, train

torch_bridge = pytest.importorskip("torch_bridge")  # with torch and transformers: the dev install has them


def flat(state) -> dict:
    return {k: np.array(v) for k, v in flatten_dict(state.to_pure_dict()).items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_hf_gpt2):
    root = tmp_path_factory.mktemp("lora")
    data = prepare.prepare(str(root / "data"), dataset="text", input=corpus.write(root / "t.txt", 100_000),
                           tokenizer="gpt2")
    make_hf_gpt2(vocab_size=50257, n_positions=64).save_pretrained(root / "hf")
    return root, data


@pytest.fixture(scope="module")
def whole(setup):
    """A 4-step LoRA run from the HF weights: (its workdir, its final state)."""
    root, data = setup
    return root / "whole", train.train(lora_config(data, root / "hf"), str(root / "whole"))


def lora_config(data, hf_dir, **overrides):
    config = importlib.import_module("configs.tiny").get_config()
    config.update_from_flattened_dict({"data.dir": data, "init_from": f"hf:{hf_dir}", "lora.rank": 4,
                                       "lora.alpha": 8.0, "lora.targets": "attn,mlp", "optim.lr": 1e-2, "max_steps": 4,
                                       "eval_every": 2, "sample_tokens": 0, "optim.warmup_steps": 1, **overrides})
    return config


def test_only_the_adapters_train_and_the_base_stays_bit_identical(setup, whole):
    root, _ = setup
    base = flat(nnx.state(loader.crop_block_size(torch_bridge.from_hf(str(root / "hf")), 32), nnx.Param))
    state = whole[1]
    after = flat(state.params)
    adapters = {k for k in after if k[-1] in ("lora_a", "lora_b")}
    assert adapters and set(after) - adapters == set(base)
    assert all(np.array_equal(after[k], base[k]) for k in base)  # frozen, bit for bit
    assert all(np.abs(after[k]).max() > 0 for k in adapters if k[-1] == "lora_b")  # B left 0: it trained
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]  # Adam's mu and nu, nothing else
    assert len(moments) == 2 * len(adapters)
    assert sum(x.size for x in moments) == 2 * sum(after[k].size for k in adapters)


def test_the_initial_lora_model_is_the_base_model(setup):
    root, _ = setup
    base = torch_bridge.from_hf(str(root / "hf"))
    lora = model.build(dataclasses_replace(base.config, lora_rank=8, lora_targets=("attn", "mlp")), 3)
    nnx.update(lora, model.with_weights(lora, nnx.state(base, nnx.Param)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50257, (2, 24)))
    np.testing.assert_array_equal(np.asarray(lora(ids)[0]), np.asarray(base(ids)[0]))


def dataclasses_replace(config, **fields):
    import dataclasses
    return dataclasses.replace(config, **fields)


def test_resume_is_bit_exact(setup, whole):
    root, data = setup
    train.train(lora_config(data, root / "hf", max_steps=2), str(root / "halves"))
    resumed = train.train(lora_config(data, root / "hf"), str(root / "halves"))
    a, b = flat(whole[1].params), flat(resumed.params)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_export_merges_the_adapters_and_sample_uses_the_run(whole, tmp_path):
    import torch
    lora = checkpoint.load_model(str(whole[0]))  # what `sample --ckpt=WORKDIR` and `evaluate --ckpt=WORKDIR` load
    assert (lora.config.lora_rank, lora.config.lora_alpha) == (4, 8.0)  # the run's settings, not the defaults
    hf_dir = torch_bridge.save_hf(lora, str(tmp_path / "hf"))
    import transformers
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = np.random.default_rng(1).integers(0, 50257, (2, 24))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(lora(jnp.asarray(ids))[0])[..., :50257]
    print(f"\nmerged export vs the unmerged LoRA model: max |logits diff| {np.abs(ours - theirs).max():.2g}")
    assert np.abs(ours - theirs).max() <= 1e-5
    assert len(generate.generate(lora, [[464, 2068, 7586]], max_new_tokens=8, temperature=0)[0]) == 8


def test_adapter_dropout_acts_in_training_only():
    config = model.GPTConfig(vocab_size=128, valid_vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32,
                             lora_rank=4, lora_targets=("attn", "mlp"))
    plain, dropped = (model.build(dataclasses_replace(config, lora_dropout=rate), 0) for rate in (0.0, 0.5))
    for m in (plain, dropped):  # B != 0, so the adapters change the output
        state = nnx.state(m, nnx.LoRAParam)
        nnx.update(m, jax.tree.map(lambda x: x + 0.1, state))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 16)))
    key = jax.random.key(0)
    assert float(plain.loss(ids, ids)) == float(dropped.loss(ids, ids))  # evaluation: no dropout
    assert float(plain.loss(ids, ids, rng=key)) == float(plain.loss(ids, ids))  # rate 0: a key changes nothing
    assert float(dropped.loss(ids, ids, rng=key)) != float(dropped.loss(ids, ids))


def test_adapters_on_the_speedrun_blocks_merge_into_the_same_model():
    """LoRA beside QK-norm, value embeddings, ReLU^2 and soft-capped logits: the merged model (what exports and
    int8 decoding take) computes what the adapted one does."""
    config = model.GPTConfig(vocab_size=128, valid_vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32,
                             qk_norm=True, value_embeds=1, mlp="relu2", logit_softcap=5.0, positions="rope",
                             lora_rank=4, lora_targets=("attn", "mlp"))
    m = model.build(config, 0)
    state = nnx.state(m, nnx.LoRAParam)
    nnx.update(m, jax.tree.map(lambda x: x + 0.1, state))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 16)))
    merged = model.merge_lora(m)
    assert merged.config.lora_rank == 0 and merged.h[0].attn.value_mix.lambdas.shape == (2,)
    # float32 rounding of W + (alpha / r) A B apart (GPT-2's blocks with these adapters: 4.5e-5 on logits of 0.4)
    np.testing.assert_allclose(np.asarray(merged(ids)[0]), np.asarray(m(ids)[0]), atol=2e-4, rtol=0)
    assert not np.allclose(np.asarray(merged(ids)[0]), np.asarray(model.merge_lora(model.build(config, 0))(ids)[0]))
