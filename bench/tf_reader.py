"""Reading OpenAI's GPT-2 checkpoints: torch_bridge's numpy reader against TensorFlow's, in fresh processes (ABBA).

    python bench/tf_reader.py --dir=/tmp/openai_124M [--rounds=4]

--dir: a model directory of OpenAI's release (models/124M); one without a checkpoint gets a random 124M-shaped
one, written by TensorFlow's v1 Saver. Each run imports its reader (torch_bridge/tf_checkpoint.py by itself, or
tensorflow) and reads every variable into memory; the data file is read once first, so both find it cached.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from fresh import abba, run_json

FLAGS = flags.FLAGS
flags.DEFINE_string("dir", "/tmp/openai_124M", "the model directory (written when it holds no checkpoint)")
flags.DEFINE_integer("rounds", 4, "ABBA rounds")
flags.DEFINE_string("side", "", "internal: run one side in this process (ours or tf) and print JSON")
C, V, T, L = 768, 50257, 1024, 12  # GPT-2 124M
WRITER = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
tf.compat.v1.disable_eager_execution()
with tf.Graph().as_default(), tf.compat.v1.Session() as session:
    variables = []
    for name, array in np.load(sys.argv[2]).items():
        variables.append(tf.compat.v1.get_variable(name, array.shape, tf.float32))
        variables[-1].load(array, session)
    os.chdir(sys.argv[1])
    tf.compat.v1.train.Saver(variables, save_relative_paths=True).save(session, "model.ckpt")
"""


def write_checkpoint(directory: str) -> None:
    rng = np.random.default_rng(0)
    shapes = {"model/wte": (V, C), "model/wpe": (T, C), "model/ln_f/g": (C,), "model/ln_f/b": (C,)}
    for i in range(L):
        shapes.update({f"model/h{i}/{ln}/{p}": (C,) for ln in ("ln_1", "ln_2") for p in "gb"})
        for layer, (nx, nf) in {"attn/c_attn": (C, 3 * C), "attn/c_proj": (C, C), "mlp/c_fc": (C, 4 * C),
                                "mlp/c_proj": (4 * C, C)}.items():
            shapes.update({f"model/h{i}/{layer}/w": (1, nx, nf), f"model/h{i}/{layer}/b": (nf,)})
    os.makedirs(directory, exist_ok=True)
    arrays = os.path.join(directory, "arrays.npz")
    np.savez(arrays, **{k: 0.02 * rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()})
    subprocess.run([sys.executable, "-c", WRITER, directory, arrays], check=True)
    os.remove(arrays)
    with open(os.path.join(directory, "hparams.json"), "w") as f:
        json.dump(dict(n_vocab=V, n_ctx=T, n_embd=C, n_head=12, n_layer=L), f)


def one_side(side: str, directory: str) -> dict:
    start = time.perf_counter()
    if side == "ours":  # the module alone: what the reader costs on top of torch_bridge's own imports
        path = os.path.join(os.path.dirname(__file__), "..", "torch_bridge", "tf_checkpoint.py")
        spec = importlib.util.spec_from_file_location("tf_checkpoint", path)
        reader = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reader)
        imported = time.perf_counter()
        arrays = {k: np.array(v) for k, v in reader.read(reader.checkpoint_prefix(directory)).items()}
    else:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import tensorflow as tf
        imported = time.perf_counter()
        checkpoint = tf.train.load_checkpoint(directory)
        arrays = {k: checkpoint.get_tensor(k) for k in checkpoint.get_variable_to_shape_map()}
    done = time.perf_counter()
    return dict(import_s=imported - start, read_s=done - imported, mb=sum(a.nbytes for a in arrays.values()) / 1e6)


def main(argv):
    del argv
    if FLAGS.side:
        print(json.dumps(one_side(FLAGS.side, FLAGS.dir)))
        return
    if not os.path.isfile(os.path.join(FLAGS.dir, "checkpoint")):
        write_checkpoint(FLAGS.dir)
    with open(os.path.join(FLAGS.dir, "model.ckpt.data-00000-of-00001"), "rb") as f:
        while f.read(1 << 24):  # into the page cache
            pass
    for side in abba(["ours", "tf"], FLAGS.rounds):
        r = run_json(__file__, f"--side={side}", f"--dir={FLAGS.dir}")
        print(f"{side:4s}  import {r['import_s']:.3f} s  read {r['mb']:.0f} MB {r['read_s']:.2f} s", flush=True)


if __name__ == "__main__":
    app.run(main)
