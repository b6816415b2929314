"""Numerics: model.matmul_precision reaches every dot of the compiled programs; float16 training under a loss scale
(jaxgpt/loss_scale.py) skips exactly the steps whose gradients overflow, scales the gradients the chunked loss takes
in its forward pass, and trains as bfloat16 does."""
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from jaxgpt import generate, loss_scale, sharding, step
from jaxgpt import model as gpt
from jaxgpt.errors import UserValueError
from jaxgpt.ops import KERNELS
from jaxgpt.serving import engine
from jaxgpt.serving.request import Request, Sampling

SMALL = dict(vocab_size=128, valid_vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=32)


def dot_precisions(hlo: str) -> list[str]:
    """The precision of every dot_general in lowered StableHLO text ('' where it has none)."""
    dots = re.findall(r"stablehlo\.dot_general[^\n]*", hlo)
    assert dots, "no dots found"
    return [m.group(1) if (m := re.search(r"precision = \[(\w+), \1\]", d)) else "" for d in dots]


def recording(name, jitted, seen):
    """jitted, recording the lowered text of its first call's program in seen[name]."""
    def call(*args, **kwargs):
        seen.setdefault(name, jitted.lower(*args, **kwargs).as_text())
        return jitted(*args, **kwargs)
    return call


def lowered_programs(config: gpt.GPTConfig) -> dict[str, str]:
    """The StableHLO of the train step (forward, backward, optimizer), the evaluation loss, generation (prefill,
    decode step, the device loop) and the serving engine's prefill and decode for one model config."""
    c = base.get_config()
    c.update_from_flattened_dict({"max_steps": 4, "optim.warmup_steps": 1, "mesh.data": 1})
    steps = step.make_steps(c, config, sharding.make_mesh(c.mesh, jax.devices()[:1]))
    batch = {k: jax.ShapeDtypeStruct((1, 1, 2, config.block_size), jnp.int32) for k in ("inputs", "targets")}
    seen = {"train_steps": steps.train_steps.lower(steps.abstract_state, batch).as_text(),
            "eval_loss": steps.eval_loss.lower(steps.abstract_state.params,
                                               jax.tree.map(lambda b: b.update(shape=b.shape[1:]), batch)).as_text()}
    model = gpt.build(config)
    real = generate.programs

    def programs(graphdef, treedef):
        names = ("prefill", "decode_step", "generate_on_device")
        return tuple(recording(n, f, seen) for n, f in zip(names, real(graphdef, treedef), strict=True))
    generate.programs = programs
    try:
        for loop in ("python", "device"):
            generate.generate(model, [[1, 2, 3]], max_new_tokens=2, temperature=0, loop=loop)
    finally:
        generate.programs = real
    eng = engine.Engine(model, max_batch=2)
    eng.runner.prefill_program = recording("engine prefill", eng.runner.prefill_program, seen)
    eng.runner.decode_program = recording("engine decode", eng.runner.decode_program, seen)
    eng.start()
    try:
        done = threading.Event()
        eng.submit(Request([1, 2, 3], Sampling(max_tokens=3, temperature=0.0), 1,
                                  on_token=lambda c, t: None, on_finish=lambda c, why: done.set()))
        assert done.wait(120)
    finally:
        eng.stop()
    return seen


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["high", "highest"])
def test_matmul_precision_reaches_every_dot_of_every_program(precision):
    config = gpt.GPTConfig(**SMALL, matmul_precision=precision)
    programs = lowered_programs(config)
    assert set(programs) == {"train_steps", "eval_loss", "prefill", "decode_step", "generate_on_device",
                             "engine prefill", "engine decode"}
    for name, hlo in programs.items():
        found = dot_precisions(hlo)
        assert found == [precision.upper()] * len(found), (name, found)


def test_high_is_bf16x3_for_a_float32_model_on_a_gpu(monkeypatch):
    """JAX's HIGH is TF32 on a GPU (as its default): there a float32 model's 'high' names the bf16x3 algorithm on
    every dot; a bfloat16 model's bfloat16 dots keep their types (the algorithm would widen them to float32)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # lowering only: the algorithm lowers on a CPU too
    for dtype, bf16x3 in (("float32", True), ("bfloat16", False)):
        config = gpt.GPTConfig(**SMALL, dtype=dtype, matmul_precision="high", attention="blocked")  # no cuDNN here
        hlo = lowered_programs(config)["train_steps"]
        dots = re.findall(r"stablehlo\.dot_general[^\n]*", hlo)
        with_algorithm = [d for d in dots if "num_primitive_operations = 3" in d and "lhs_precision_type = bf16" in d]
        assert len(with_algorithm) == (len(dots) if bf16x3 else 0), (dtype, len(with_algorithm), len(dots))


def test_default_matmul_precision_leaves_jax_its_own_setting():
    """default: the model sets nothing, so JAX_DEFAULT_MATMUL_PRECISION (or XLA's default) decides."""
    config = gpt.GPTConfig(**SMALL, kernels="reference")
    with jax.default_matmul_precision(None):
        assert set(dot_precisions(lowered_programs(config)["train_steps"])) == {"DEFAULT"}
    with jax.default_matmul_precision("high"):
        assert set(dot_precisions(lowered_programs(config)["train_steps"])) == {"HIGH"}


def test_bad_precision_and_dtype_are_user_errors():
    with pytest.raises(UserValueError, match=r"matmul_precision='tf32': expected one of \['default', 'high'"):
        gpt.GPTConfig(**SMALL, matmul_precision="tf32")
    with pytest.raises(UserValueError, match=r"dtype='fp16': expected one of \['float32', 'bfloat16', 'float16'\]"):
        gpt.GPTConfig(**SMALL, dtype="fp16")


# ------------------------------------------------------------------------------------------------ loss scaling

@pytest.mark.parametrize("setting, dtype, message", [
    ("none", "float16", "model.dtype=float16 needs a loss scale"),
    ("dynamic", "bfloat16", "optim.loss_scale=dynamic is for model.dtype=float16; bfloat16 needs none"),
    ("1024", "float32", "optim.loss_scale=1024 is for model.dtype=float16"),
    ("big", "float16", "optim.loss_scale='big': expected auto, dynamic, none or a number"),
    ("-8", "float16", "a fixed scale must be a positive finite number"),
])
def test_loss_scale_settings_that_cannot_work_are_one_error(setting, dtype, message):
    with pytest.raises(UserValueError, match=re.escape(message)):
        loss_scale.create(setting, dtype, period=2000)


def test_loss_scale_settings():
    assert loss_scale.create("auto", "bfloat16", 2000) is None and loss_scale.create("auto", "float32", 2) is None
    dynamic = loss_scale.create("auto", "float16", 2000)
    assert (float(dynamic.scale), dynamic.period) == (2.0 ** 16, 2000)
    fixed = loss_scale.create("512", "float16", 2000)
    assert (float(fixed.scale), fixed.period) == (512.0, 0)
    with pytest.raises(UserValueError, match="loss_scale_period=0"):
        loss_scale.create("dynamic", "float16", 0)


def test_dynamic_scale_doubles_after_period_finite_steps_and_halves_on_overflow():
    ls = loss_scale.create("dynamic", "float16", period=3)
    history = []
    for finite in [True, True, True, True, False, True, True, True]:
        ls = ls.adjust(jnp.bool_(finite))
        history.append((float(ls.scale), int(ls.good_steps), int(ls.skipped)))
    s = 2.0 ** 16
    assert history == [(s, 1, 0), (s, 2, 0), (2 * s, 0, 0), (2 * s, 1, 0), (s, 0, 1), (s, 1, 1), (s, 2, 1),
                       (2 * s, 0, 1)]
    floor = loss_scale.LossScale(jnp.float32(1.0), jnp.int32(0), jnp.int32(0), period=3).adjust(jnp.bool_(False))
    assert float(floor.scale) == 1.0  # the least scale
    fixed = loss_scale.create("8", "float16", 3)
    for finite in [True, True, True, False]:
        fixed = fixed.adjust(jnp.bool_(finite))
    assert (float(fixed.scale), int(fixed.skipped)) == (8.0, 1)


@pytest.mark.parametrize("period", [1, 3])
def test_the_dynamic_scale_follows_pytorch_gradscalers_rule(period):
    """README: PyTorch GradScaler's rule, from 2^16: torch's own update (growth 2, backoff 0.5, growth_interval
    = loss_scale_period) step by step, and the steps it skips counted; a period of 1 is allowed (>= 1)."""
    torch = pytest.importorskip("torch")
    ls = loss_scale.create("dynamic", "float16", period=period)
    scale, tracker = torch.tensor([65536.0]), torch.tensor([0], dtype=torch.int32)
    pattern = [True, True, False, True, True, True, True, False, False, True, True, True, True]
    for i, finite in enumerate(pattern):
        ls = ls.adjust(jnp.bool_(finite))
        torch._amp_update_scale_(scale, tracker, torch.tensor([0.0 if finite else 1.0]), 2.0, 0.5, period)
        assert (float(ls.scale), int(ls.good_steps)) == (scale.item(), tracker.item()), (i, finite)
        assert int(ls.skipped) == pattern[:i + 1].count(False)


def test_the_dynamic_scale_halves_down_to_1_and_no_lower():
    ls = loss_scale.LossScale(jnp.float32(4.0), jnp.int32(0), jnp.int32(0), period=5)
    scales = []
    for _ in range(4):
        ls = ls.adjust(jnp.bool_(False))
        scales.append(float(ls.scale))
    assert scales == [2.0, 1.0, 1.0, 1.0] and int(ls.skipped) == 4


def test_a_fixed_scale_never_changes_and_counts_skipped_steps():
    fixed = loss_scale.create("0.5", "float16", period=3)  # a fixed scale: any positive number, the period unused
    assert (float(fixed.scale), fixed.period) == (0.5, 0)
    history = []
    for finite in [True, False, True, True, True, True, False, False]:
        fixed = fixed.adjust(jnp.bool_(finite))
        history.append((float(fixed.scale), int(fixed.good_steps), int(fixed.skipped)))
    assert history == [(0.5, 0, 0), (0.5, 0, 1), (0.5, 0, 1), (0.5, 0, 1), (0.5, 0, 1), (0.5, 0, 1), (0.5, 0, 2),
                       (0.5, 0, 3)]


@pytest.mark.parametrize("setting, dtype, expected", [
    (" Dynamic ", "float16", ("dynamic", 2.0 ** 16, 7)), ("AUTO", "float16", ("dynamic", 2.0 ** 16, 7)),
    ("NONE", "bfloat16", None), ("none", "float32", None), ("auto", "float32", None),
    ("1e3", "float16", (1000.0, 1000.0, 0)),
])
def test_loss_scale_spellings(setting, dtype, expected):
    """configs/base.py: auto | dynamic | none | a fixed number, as typed on a command line (case and spaces)."""
    assert loss_scale.resolve(setting, dtype) == (expected and expected[0])
    made = loss_scale.create(setting, dtype, period=7)
    assert made is None if expected is None else (float(made.scale), made.period) == expected[1:]


@pytest.mark.parametrize("setting", ["0", "-1", "inf", "nan", "0.0"])
def test_a_fixed_scale_must_be_positive_and_finite(setting):
    with pytest.raises(UserValueError, match="a fixed scale must be a positive finite number"):
        loss_scale.resolve(setting, "float16")


def test_all_finite_and_select_leaf_by_leaf():
    """A step is skipped when any gradient is inf or nan, in any leaf; the skip keeps every old leaf."""
    ok = {"a": jnp.ones(3), "b": jnp.zeros((2, 2))}
    assert bool(loss_scale.all_finite(ok))
    for bad in (jnp.inf, -jnp.inf, jnp.nan):
        assert not bool(loss_scale.all_finite({**ok, "b": ok["b"].at[1, 0].set(bad)}))
        assert not bool(loss_scale.all_finite({**ok, "a": ok["a"].at[2].set(bad)}))
    new, old = {"a": jnp.full(3, 2.0), "b": (jnp.int32(5),)}, {"a": jnp.zeros(3), "b": (jnp.int32(1),)}
    for finite, expected in ((True, new), (False, old)):
        got = loss_scale.select(jnp.bool_(finite), new, old)
        assert jax.tree.structure(got) == jax.tree.structure(new)
        jax.tree.map(np.testing.assert_array_equal, got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["fast", "gpu", "reference"])
def test_the_scale_reaches_the_gradients_before_they_are_rounded_to_float16(kernels):
    """Over 32,768 tokens (124M's micro-batch) each token's share of the mean loss is 3e-5: its hidden state's
    gradient lies in float16's subnormal range, and the chunked loss takes it in its forward pass. Unscaled, some
    of it rounds to 0; the loss scale multiplies it first, and the unscaled float16 gradient is float32's within
    float16 rounding."""
    rng = np.random.default_rng(0)
    N, C, V = 32768, 32, 256
    x = jnp.asarray(rng.normal(size=(1, 1, 1, N, C)), jnp.float16)
    w = jnp.asarray(rng.normal(size=(V, C)) * 0.5, jnp.float32)
    t = jnp.asarray(rng.integers(0, V, (1, 1, 1, N)))
    kernel = KERNELS[kernels].chunked_cross_entropy

    def hidden_grad(dtype, scale):
        loss = lambda x: kernel(x, w, t, V, scale=scale)
        return np.asarray(jax.grad(loss)(x.astype(dtype)), np.float32) / scale
    exact = hidden_grad(jnp.float32, 1.0)
    unscaled, scaled = hidden_grad(jnp.float16, 1.0), hidden_grad(jnp.float16, 2.0 ** 16)
    error = {name: np.linalg.norm(g - exact) / np.linalg.norm(exact) for name, g in
             (("unscaled", unscaled), ("scaled", scaled))}
    print(f"\n[{kernels}] float16 vs float32 hidden gradients: relative error {error}, zeros unscaled "
          f"{(unscaled == 0).mean():.2%}, scaled {(scaled == 0).mean():.2%}, float32 {(exact == 0).mean():.2%}")
    assert (exact == 0).sum() == (scaled == 0).sum() == 0 and (unscaled == 0).mean() > 1e-3
    assert error["scaled"] < 1e-3 < error["unscaled"]


def fp16_steps(period=2000):
    c = base.get_config()
    c.update_from_flattened_dict({"max_steps": 10, "optim.warmup_steps": 1, "mesh.data": 1,
                                  "optim.loss_scale_period": period})
    config = gpt.GPTConfig(**SMALL, dtype="float16")
    steps = step.make_steps(c, config, sharding.make_mesh(c.mesh, jax.devices()[:1]))
    return steps, step.fresh_state(steps, config, seed=0)


def batch(targets_kept: int, seed: int):
    """One step's batch (1 step, 1 micro-batch, 2 x 32); only the first `targets_kept` targets count."""
    tokens = np.random.default_rng(seed).integers(0, 100, (1, 1, 2, 33)).astype(np.int32)
    targets = tokens[..., 1:].copy()
    targets.reshape(-1)[targets_kept:] = -1
    return {"inputs": jnp.asarray(tokens[..., :-1]), "targets": jnp.asarray(targets)}


@pytest.mark.gpu
def test_an_overflowing_step_is_skipped_whole_and_halves_the_scale():
    """A batch whose loss rests on one token: its gradient, times the scale 2^16, exceeds float16's 65,504. That
    step changes no weight and no optimizer moment (nor Adam's count), halves the scale and is counted; the steps
    around it train."""
    steps, state = fp16_steps()
    state, first = steps.train_steps(state, batch(64, seed=1))
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, bad = steps.train_steps(state, batch(1, seed=2))
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert int(bad["skipped"][0]) == 1 and int(bad["skipped_steps"][0]) == 1 and int(first["skipped"][0]) == 0
    assert not np.isfinite(bad["grad_norm"][0]) and np.isfinite(bad["loss"][0])
    assert (float(bad["loss_scale"][0]), float(state.loss_scale.scale)) == (2.0 ** 16, 2.0 ** 15)
    state, last = steps.train_steps(state, batch(64, seed=3))
    assert int(last["skipped"][0]) == 0 and float(last["loss_scale"][0]) == 2.0 ** 15
    assert last["lr"][0] == bad["lr"][0] > first["lr"][0]  # optax's count stood still: schedule(1) again, the peak
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state.params, before[0])
    assert min(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize("accum", [1, 2])
def test_float16_step_gradient_norm_equals_the_unscaled_float32_run(accum):
    """A finite float16 step under the scale 2^16 reports (and clips, and hands AdamW) the mean gradient unscaled:
    its gradient norm, loss and lr are the float32 run's, with one micro-batch (no division by the count) and with
    two."""
    tokens = np.random.default_rng(5).integers(0, 100, (2, accum, 2, 33)).astype(np.int32)
    batches = {"inputs": jnp.asarray(tokens[..., :-1]), "targets": jnp.asarray(tokens[..., 1:])}
    runs = {}
    for dtype in ("float32", "float16"):
        c = base.get_config()
        c.update_from_flattened_dict({"max_steps": 10, "optim.warmup_steps": 1, "mesh.data": 1,
                                      "grad_accum_steps": accum, "optim.grad_clip": 0.5})
        config = gpt.GPTConfig(**SMALL, dtype=dtype)
        steps = step.make_steps(c, config, sharding.make_mesh(c.mesh, jax.devices()[:1]))
        runs[dtype] = jax.tree.map(np.asarray, steps.train_steps(step.fresh_state(steps, config, 0), batches)[1])
    m32, m16 = runs["float32"], runs["float16"]
    assert list(m16["loss_scale"]) == [2.0 ** 16] * 2 and list(m16["skipped"]) == [0, 0]
    assert m32["grad_norm"][0] > 0.5  # clipping acts
    np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=2e-2)
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-3)
    np.testing.assert_allclose(m16["lr"], m32["lr"], rtol=1e-7)


@pytest.mark.gpu
def test_float16_gradients_equal_float32_s_within_float16_rounding():
    """The unscaled float16 gradient of a step against float32's: the loss scale is divided out exactly once."""
    config = gpt.GPTConfig(**SMALL)
    model = gpt.build(config, seed=1)
    b = batch(64, seed=4)
    graphdef, params = nnx.split(model, nnx.Param)

    def grads(dtype, scale):
        g = jax.grad(step.loss_fn)(params, nnx.split(gpt.build(gpt.GPTConfig(**SMALL, dtype=dtype)))[0],
                                   b["inputs"][0, 0], b["targets"][0, 0], None, scale)
        return np.concatenate([np.ravel(x) / (scale or 1) for x in jax.tree.leaves(g)])
    del graphdef
    exact, half = grads("float32", None), grads("float16", 2.0 ** 16)
    assert np.linalg.norm(half - exact) / np.linalg.norm(exact) < 1e-2


# ------------------------------------------------------------------------- the CPU recipe in float16 and after it

RECIPE_STEPS = 600


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """configs/shakespeare_char_cpu.py (its model, batch and optimizer; RECIPE_STEPS steps, a schedule that ends
    there) in bfloat16 and in float16 on the same data: {dtype: workdir}."""
    import corpus

    from jaxgpt import prepare, train
    root = tmp_path_factory.mktemp("recipe")
    data = prepare.prepare(str(root / "data"), dataset="text", input=corpus.write(root / "text.txt", 300_000),
                           tokenizer="char")
    runs = {}
    for dtype in ("bfloat16", "float16"):
        config = __import__("configs.shakespeare_char_cpu", fromlist=["_"]).get_config()
        config.update_from_flattened_dict({
            "data.dir": data, "model.dtype": dtype, "max_steps": RECIPE_STEPS, "optim.decay_steps": RECIPE_STEPS,
            "eval_every": RECIPE_STEPS // 2, "sample_tokens": 0, "progress_bar": False})
        train.train(config, str(root / dtype))
        runs[dtype] = root / dtype
    return runs


@pytest.mark.slow
def test_the_cpu_recipe_in_float16_ends_where_bfloat16_does(recipe_runs):
    from jaxgpt import plot
    rows = {dtype: plot.read_metrics(str(workdir)) for dtype, workdir in recipe_runs.items()}
    val = {dtype: {r["step"]: r["val_loss"] for r in rs if "val_loss" in r} for dtype, rs in rows.items()}
    print(f"\nval loss at steps {sorted(val['float16'])}: bfloat16 {val['bfloat16']}, float16 {val['float16']}")
    assert sorted(val["float16"]) == sorted(val["bfloat16"]) == [RECIPE_STEPS // 2, RECIPE_STEPS]
    for at in val["float16"]:
        assert abs(val["float16"][at] - val["bfloat16"][at]) <= 0.05
    assert val["float16"][RECIPE_STEPS] < val["float16"][RECIPE_STEPS // 2] - 0.1  # it learned
    scaled = [r for r in rows["float16"] if "loss_scale" in r]
    assert scaled and all(r["loss_scale"] >= 1 for r in scaled)
    assert not any("loss_scale" in r for r in rows["bfloat16"])


@pytest.mark.slow
def test_a_float16_run_samples_evaluates_exports_and_serves(recipe_runs, tmp_path):
    """The float16 workdir as every consumer takes it: greedy sampling (the device loop) equals the serving engine's
    greedy tokens, the evaluation loss is the trainer's final val loss's neighbour, the HF export computes what
    the float32 model computes, and `jaxgpt.sample` runs on it."""
    import subprocess
    import sys

    import torch
    import transformers

    import torch_bridge
    from jaxgpt import evaluate, loader, tokenizer
    workdir = str(recipe_runs["float16"])
    model = loader.load(workdir)
    assert model.config.dtype == "float16"
    tok = tokenizer.load_tokenizer(workdir)
    prompt = tok.encode("The ")
    greedy = generate.generate(model, [prompt], max_new_tokens=40, temperature=0)[0]
    eng = engine.Engine(model, max_batch=2).start()
    try:
        served, done = [], threading.Event()
        eng.submit(Request(prompt, Sampling(max_tokens=40, temperature=0.0), 1,
                                  on_token=lambda c, t: served.append(t), on_finish=lambda c, why: done.set()))
        assert done.wait(120)
    finally:
        eng.stop()
    assert served == greedy
    data_dir = str(recipe_runs["float16"].parent / "data")
    scored = evaluate.evaluate_loss(model, evaluate.read_split(data_dir, "val", model.config.vocab_size))
    from jaxgpt import plot
    trainer_val = [r["val_loss"] for r in plot.read_metrics(workdir) if "val_loss" in r][-1]
    assert abs(scored["loss"] - trainer_val) < 0.2, (scored, trainer_val)  # every window, not 20 random batches
    hf_dir = torch_bridge.save_hf(model, str(tmp_path / "hf"), tok)
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = np.asarray([prompt + greedy])
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(loader.load(workdir, dtype="float32")(jnp.asarray(ids))[0])[..., :theirs.shape[-1]]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    done = subprocess.run([sys.executable, "-m", "jaxgpt.sample", f"--ckpt={workdir}", "--prompt=The ",
                           "--max_new_tokens=20", "--temperature=0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and tok.decode(prompt + greedy[:20]) in done.stdout, done.stderr[-2000:]
