"""OpenAI's GPT-2 release (openai:DIR): a tiny random GPT-2 laid out as OpenAI's download_model.py fetches it,
written by TensorFlow's v1 Saver, is imported through the CLI and compared with TensorFlow's reader, a Hugging
Face GPT2LMHeadModel built from the same arrays, HF generate and transformers.pipeline."""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxgpt import generate, loader, tokenizer
from torch_bridge import convert, mapping, tf_checkpoint
from torch_bridge.__main__ import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HPARAMS = dict(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2)
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262]  # "The quick brown fox jumps over the"
# Each job (directory, arrays.npz) becomes DIR/model.ckpt.{index,data-00000-of-00001,meta} and DIR/checkpoint as
# OpenAI's release has them (tf.compat.v1 Saver, the path relative), plus DIR/tf_read.npz: what
# tf.train.load_checkpoint reads back. TensorFlow runs in its own process: it never meets torch or jax here.
WRITER = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
tf.compat.v1.disable_eager_execution()
for directory, arrays in json.loads(sys.argv[1]):
    os.chdir(directory)
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        variables = []
        for name, array in np.load(arrays).items():  # fed, not constants: the graph in model.ckpt.meta stays small
            variables.append(tf.compat.v1.get_variable(name, array.shape, tf.as_dtype(array.dtype)))
            variables[-1].load(array, session)
        tf.compat.v1.train.Saver(variables, save_relative_paths=True).save(session, "model.ckpt")
    reader = tf.train.load_checkpoint(directory)
    np.savez("tf_read.npz", **{name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()})
"""


def openai_arrays(seed=0, scale=0.1) -> dict[str, np.ndarray]:
    """Random weights under OpenAI's names and shapes (gpt-2's src/model.py: conv1d kernels w [1, nx, nf]). At
    scale 0.1 the logits reach ~4 and float32 rounding leaves HF's and jaxgpt's ~3e-6 apart; the error grows with
    the logits (scale 0.2: logits ~8, each forward ~8e-6 from a float64 one, 1.1e-5 apart)."""
    rng = np.random.default_rng(seed)
    C, V, T = HPARAMS["n_embd"], HPARAMS["n_vocab"], HPARAMS["n_ctx"]

    def normal(*shape, mean=0.0):
        return (mean + scale * rng.standard_normal(shape)).astype(np.float32)
    arrays = {"model/wte": normal(V, C), "model/wpe": normal(T, C), "model/ln_f/g": normal(C, mean=1),
              "model/ln_f/b": normal(C)}
    for i in range(HPARAMS["n_layer"]):
        for ln in ("ln_1", "ln_2"):
            arrays.update({f"model/h{i}/{ln}/g": normal(C, mean=1), f"model/h{i}/{ln}/b": normal(C)})
        for layer, (nx, nf) in {"attn/c_attn": (C, 3 * C), "attn/c_proj": (C, C), "mlp/c_fc": (C, 4 * C),
                                "mlp/c_proj": (4 * C, C)}.items():
            arrays.update({f"model/h{i}/{layer}/w": normal(1, nx, nf), f"model/h{i}/{layer}/b": normal(nf)})
    return arrays


def hf_reference(arrays) -> transformers.GPT2LMHeadModel:
    """GPT2LMHeadModel holding the arrays, named as transformers' old load_tf_weights_in_gpt2 named them: w and g
    are weights (w squeezed to Conv1D's [nx, nf]), b biases, wte and wpe embeddings."""
    config = transformers.GPT2Config(vocab_size=HPARAMS["n_vocab"], n_positions=HPARAMS["n_ctx"],
                                     n_embd=HPARAMS["n_embd"], n_head=HPARAMS["n_head"], n_layer=HPARAMS["n_layer"],
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
    sd = {}
    for name, array in arrays.items():
        key = re.sub(r"/h(\d+)/", r"/h.\1/", name).replace("model/", "transformer.").replace("/", ".")
        key = re.sub(r"\.[wg]$", ".weight", re.sub(r"\.b$", ".bias", key))
        key += ".weight" if name in ("model/wte", "model/wpe") else ""
        sd[key] = torch.from_numpy(array[0] if array.ndim == 3 else array)
    hf.load_state_dict({**sd, "lm_head.weight": sd["transformer.wte.weight"]}, strict=True)
    return hf


def write_dir(directory, arrays, hparams=HPARAMS, encoder_files=True):
    """DIR/arrays.npz (for WRITER), hparams.json and the GPT-2 encoder files, as the release lays them out."""
    os.makedirs(directory, exist_ok=True)
    np.savez(os.path.join(directory, "arrays.npz"), **arrays)
    with open(os.path.join(directory, "hparams.json"), "w") as f:
        json.dump(hparams, f, indent=2)
    for name, path in tokenizer.bundled_gpt2_files().items() if encoder_files else ():
        shutil.copyfile(path, os.path.join(directory, name))
    return [str(directory), os.path.join(directory, "arrays.npz")]


BROKEN = {  # name -> the arrays that TensorFlow writes instead of the good ones
    "missing variable": lambda a: {k: v for k, v in a.items() if k != "model/h1/mlp/c_fc/b"},
    "wrong shape": lambda a: {**a, "model/h1/attn/c_attn/w": a["model/h1/attn/c_attn/w"][0]},  # squeezed
    "another architecture": lambda a: {"bert/embeddings/word_embeddings": a["model/wte"][:100],
                                       "bert/pooler/dense/kernel": a["model/h0/attn/c_proj/w"][0].astype(np.float16),
                                       "global_step": np.int64(7), "bert/layer_0/count": np.arange(3, dtype=np.int32),
                                       "bert/ln/eps": np.float64([1e-12])},  # every dtype the reader reads
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """root/124M (the good model), root/{BROKEN}, and root/imported: 124M through `torch_bridge import`."""
    root = tmp_path_factory.mktemp("openai")
    arrays = openai_arrays()
    jobs = [write_dir(root / "124M", arrays)] + [write_dir(root / name, breakage(arrays))
                                                  for name, breakage in BROKEN.items()]
    done = subprocess.run([sys.executable, "-c", WRITER, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, "TensorFlow (the dev extra) wrote no checkpoint:\n" + done.stderr[-3000:]
    with contextlib.redirect_stdout(io.StringIO()):
        cli_main(["import", "--from", f"openai:{root / '124M'}", "--out", str(root / "imported")])
    return root, arrays


def test_reader_equals_tensorflows(release):
    root, _ = release
    for name in ["124M", *BROKEN]:
        theirs = dict(np.load(root / name / "tf_read.npz"))
        ours = tf_checkpoint.read(tf_checkpoint.checkpoint_prefix(str(root / name)))
        assert ours.keys() == theirs.keys(), name
        for key, array in theirs.items():
            assert ours[key].dtype == array.dtype and ours[key].shape == array.shape, key
            assert np.array_equal(ours[key], array), key
    assert (root / "124M" / "checkpoint").read_text().startswith('model_checkpoint_path: "model.ckpt"\n')


def test_checkpoint_prefix_of_a_moved_directory_or_one_without_checkpoint_file(release, tmp_path):
    root, _ = release
    moved = tmp_path / "moved"
    shutil.copytree(root / "124M", moved)
    (moved / "checkpoint").write_text('model_checkpoint_path: "/gone/models/124M/model.ckpt"\n')
    assert tf_checkpoint.checkpoint_prefix(str(moved)) == str(moved / "model.ckpt")
    (moved / "checkpoint").unlink()
    assert tf_checkpoint.checkpoint_prefix(str(moved)) == str(moved / "model.ckpt")


def test_import_matches_hf_built_from_the_same_arrays(release):
    root, arrays = release
    model = loader.load(str(root / "imported"))  # the jaxgpt model directory the CLI wrote
    c = model.config
    assert (c.vocab_size, c.n_valid_vocab, c.block_size, c.n_layer, c.n_head, c.n_embd) == (50304, 50257, 128, 2, 4,
                                                                                            64)
    assert (c.activation, c.layer_norm_epsilon, c.bias, c.tie_embeddings) == ("gelu_tanh", 1e-5, True, True)
    idx = np.random.default_rng(1).integers(0, 50257, (2, 40))
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(model(jnp.asarray(idx))[0])
    with torch.no_grad():
        theirs = hf_reference(arrays)(torch.as_tensor(idx)).logits.numpy()
    diff = np.abs(ours[..., :50257] - theirs).max()
    print(f"\n[openai import] max |logits - HF logits| = {diff:.3g} (logits up to {np.abs(theirs).max():.3g})")
    assert diff <= 1e-5 and np.all(np.isneginf(ours[..., 50257:]))
    # the table runs backwards to the very arrays, and loader's openai: spec reads what the CLI imported
    back = convert.state_dict(model, mapping.OPENAI)
    assert back.pop(mapping.HEAD) is back["model/wte"]  # the tied head, which OpenAI's files do not store
    assert back.keys() == arrays.keys() and all(np.array_equal(back[k].numpy(), arrays[k]) for k in arrays)
    assert convert.export_config(model.config, mapping.OPENAI) == HPARAMS
    direct = convert.state_dict(loader.load(f"openai:{root / '124M'}"), mapping.OPENAI)
    assert all(torch.equal(direct[k], back[k]) for k in back)


def test_greedy_tokens_equal_hf_generate(release):
    root, arrays = release
    model, hf = loader.load(str(root / "imported")), hf_reference(arrays)
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                          do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)
    expected = out.sequences[0, len(PROMPT):].tolist()
    margin = min(float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores)
    print(f"\n[openai greedy] smallest top-2 logit margin on HF's path: {margin:.3g}")
    assert len(expected) == 24 and margin > 1e-3
    assert generate.generate(model, [PROMPT], max_new_tokens=24, temperature=0.0) == [expected]


PIPELINE = """
import json, sys, transformers
pipe = transformers.pipeline("text-generation", model=sys.argv[1])
ids = pipe(sys.argv[2], do_sample=False, max_new_tokens=12, return_tensors=True)[0]["generated_token_ids"]
print(json.dumps([int(t) for t in ids]))
"""


def test_tokenizer_is_saved_and_the_hf_export_runs_in_pipeline(release):
    root, _ = release
    tok = tokenizer.stored_with(str(root / "imported"))
    assert isinstance(tok, tokenizer.GPT2Tokenizer) and tok.encode("The quick brown fox jumps over the") == PROMPT
    with contextlib.redirect_stdout(io.StringIO()):
        cli_main(["export", "--ckpt", str(root / "imported"), "--to", f"hf:{root / 'hf'}"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PIPELINE, str(root / "hf"), tok.decode(PROMPT)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    model = loader.load(str(root / "imported"))
    ours = generate.generate(model, [PROMPT], max_new_tokens=12, temperature=0.0, eot_id=tok.eot)[0]
    assert theirs == PROMPT + ours


def test_encoder_files_that_are_not_gpt2s_are_used_as_they_are(tmp_path):
    files = tokenizer.bundled_gpt2_files()
    shutil.copyfile(files["encoder.json"], tmp_path / "encoder.json")
    merges = open(files["vocab.bpe"], encoding="utf-8").read().split("\n")
    assert merges[-2] == "\u0120g azed"  # the last merge: " gazed" is one GPT-2 token
    (tmp_path / "vocab.bpe").write_text("\n".join(merges[:-2] + [""]), encoding="utf-8")
    ours = tokenizer.stored_with(f"openai:{tmp_path}")
    theirs = transformers.GPT2Tokenizer(vocab=str(tmp_path / "encoder.json"), merges=str(tmp_path / "vocab.bpe"))
    text, gpt2 = "She gazed at the sign, naïvely:  3.14 \u2603!\n\n", tokenizer.GPT2Tokenizer()
    assert isinstance(ours, tokenizer.BPETokenizer) and ours.eot == 50256
    assert ours.encode(text) == theirs.encode(text) != gpt2.encode(text) and ours.decode(ours.encode(text)) == text
    assert ours.encode(tokenizer.ENDOFTEXT) == gpt2.encode(tokenizer.ENDOFTEXT)  # as text, jaxgpt's convention
    ours.save(str(tmp_path))  # as the import saves it with the model
    assert tokenizer.load_tokenizer(str(tmp_path)).encode(text) == ours.encode(text)
    assert tokenizer.stored_with(f"openai:{tmp_path / 'nowhere'}") is None


def break_dir(root, name) -> str:
    """A copy of the good model with one thing wrong, or one of the BROKEN checkpoints."""
    if name in BROKEN:
        return str(root / name)
    directory = root / "broken" / name
    if not directory.exists():
        shutil.copytree(root / "124M", directory)
        if name == "no hparams.json":
            (directory / "hparams.json").unlink()
        elif name == "no checkpoint files":
            for f in directory.glob("model.ckpt.*"):
                f.unlink()
            (directory / "checkpoint").unlink()
        elif name == "no data file":
            (directory / "model.ckpt.data-00000-of-00001").unlink()
        else:
            hparams = {"another architecture's hparams": {**HPARAMS, "rotary_dim": 16},  # GPT-J's
                       "hparams of another model": dict(vocab_size=50257, hidden_size=64, num_hidden_layers=2)}[name]
            (directory / "hparams.json").write_text(json.dumps(hparams))
    return str(directory)


ERRORS = {  # name -> what the one line says, the file or variable named
    "no hparams.json": r"no hparams.json/hparams.json: no such file",
    "no checkpoint files": r"no checkpoint files/checkpoint: no such file, and .* holds 0 \*.index files",
    "no data file": r"model.ckpt.data-00000-of-00001: no such file",
    "another architecture's hparams": r"hparams.json: \['rotary_dim'\] are not OpenAI GPT-2 settings",
    "hparams of another model": r"hparams.json: its model config lacks \['n_layer', 'n_head', 'n_embd', 'n_ctx', "
                                r"'n_vocab'\]",
    "missing variable": r"missing variable/model.ckpt.index does not match .* missing keys: "
                        r"\['model/h1/mlp/c_fc/b'\]$",
    "wrong shape": r"wrong shape/model.ckpt.index does not match .* wrong shapes: \['model/h1/attn/c_attn/w: got "
                   r"\(64, 192\), expected \(1, 64, 192\)'\]$",
    "another architecture": r"another architecture/model.ckpt.index is not an OpenAI GPT-2 checkpoint: it has no "
                            r"variable model/wte \(it has bert/embeddings/word_embeddings, bert/layer_0/count, "
                            r"bert/ln/eps, \.\.\.\)",
}


@pytest.mark.parametrize("name", ERRORS)
def test_bad_directory_is_one_line_naming_the_file_or_variable(release, capsys, name):
    root, _ = release
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["import", "--from", f"openai:{break_dir(root, name)}", "--out", str(root / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(ERRORS[name], err.strip()), err
    assert not (root / "out").exists()


def test_n_head_is_refused_for_openai_dirs(release, capsys):
    root, _ = release
    with pytest.raises(SystemExit):
        cli_main(["import", "--from", f"openai:{root / '124M'}", "--out", str(root / "out"), "--n-head", "2"])
    assert "--n-head is for bare state dicts" in capsys.readouterr().err
