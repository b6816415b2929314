"""Loss/perplexity and HellaSwag scores against the same quantities computed with the Hugging Face torch model."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_bridge
from jaxgpt import checkpoint, data, evaluate
from jaxgpt.tokenizer import get_tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hellaswag_tiny.jsonl")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small(make_hf_gpt2):
    """(hf, jaxgpt) pair of a small random GPT-2 over a 100-token vocabulary."""
    hf = make_hf_gpt2(initializer_range=0.1)
    return hf, torch_bridge.from_hf(hf)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for i, n in enumerate((150, 97)):
        data.write_shard(str(directory / f"val_{i:06d}.bin"), rng.integers(0, 100, n))
    data.write_shard(str(directory / "train_000000.bin"), rng.integers(0, 100, 50))
    return str(directory)


def hf_strided_loss(hf, streams, block_size, stride):
    """Hugging Face's perplexity-guide loop: windows of block_size + 1 tokens sliding by `stride`; only the targets
    not scored by an earlier window count."""
    total, count = 0.0, 0
    for tokens in streams:
        tokens = torch.tensor(np.asarray(tokens, np.int64))
        seq_len, prev_end = len(tokens), 0
        for begin in range(0, seq_len, stride):
            end = min(begin + block_size + 1, seq_len)
            window = tokens[begin:end]
            with torch.no_grad():
                logits = hf(window[None]).logits[0, :-1]
            nll = F.cross_entropy(logits, window[1:], reduction="none")
            new = end - max(prev_end, 1)  # the first token of a stream is never a target
            total += nll[len(nll) - new:].double().sum().item()
            count += new
            prev_end = end
            if end == seq_len:
                break
    return total / count, count


@pytest.mark.parametrize("stride", [None, 12])
def test_loss_matches_hf(small, shards, stride):
    hf, model = small
    streams = evaluate.read_split(shards, "val", model.config.n_valid_vocab)
    assert [len(s) for s in streams] == [150, 97]
    got = evaluate.evaluate_loss(model, streams, block_size=32, stride=stride, batch_size=3)
    want, count = hf_strided_loss(hf, streams, 32, stride or 32)
    assert got["tokens"] == count == 150 - 1 + 97 - 1
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)


def test_loss_cli(small, shards, tmp_path):
    hf, model = small
    model_dir = checkpoint.save_model(model, str(tmp_path / "model"))
    cmd = [sys.executable, "-m", "jaxgpt.evaluate", f"--ckpt={model_dir}", "--task=loss", f"--data={shards}",
           "--block_size=32", "--stride=16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr
    loss = float(re.search(r"val loss (\S+) perplexity", done.stdout).group(1))
    want, _ = hf_strided_loss(hf, evaluate.read_split(shards, "val", 100), 32, 16)
    assert loss == pytest.approx(want, abs=1e-4)


def hf_hellaswag(hf, tok, examples):
    """build-nanogpt's hellaswag.py scoring with the torch model: per ending, summed and mean completion loss."""
    sums, means = [], []
    for ex in examples:
        ctx = tok.encode(ex["ctx"])
        rows = [ctx + tok.encode(" " + e) for e in ex["endings"]]
        width = max(len(r) for r in rows)
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r)
            mask[i, len(ctx):len(r)] = 1
        with torch.no_grad():
            logits = hf(tokens).logits
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                                 reduction="none").view(4, -1)
        shift_mask = mask[:, 1:]
        sums.append((losses * shift_mask).sum(1))
        means.append(sums[-1] / shift_mask.sum(1))
    return torch.stack(sums).double().numpy(), torch.stack(means).double().numpy()


def test_hellaswag_matches_hf(make_hf_gpt2):
    hf = make_hf_gpt2(vocab_size=50257, bos_token_id=50256, eos_token_id=50256, initializer_range=0.3)
    model, tok = torch_bridge.from_hf(hf), get_tokenizer("gpt2")
    examples = evaluate.read_hellaswag(FIXTURE)
    assert len(examples) == 5
    want_sum, want_mean = hf_hellaswag(hf, tok, examples)
    got_sum, got_mean = evaluate.score_endings(model, tok, examples, batch_examples=2)
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)
    np.testing.assert_allclose(got_mean, want_mean, rtol=1e-5)
    assert not np.array_equal(want_sum.argmin(1), want_mean.argmin(1))  # the two metrics really differ here

    labels = np.array([ex["label"] for ex in examples])
    result = evaluate.hellaswag_eval(model, tok, FIXTURE)
    assert result == {"acc": np.mean(want_sum.argmin(1) == labels), "acc_norm": np.mean(want_mean.argmin(1) == labels),
                      "examples": 5}
    assert evaluate.hellaswag_eval(model, tok, FIXTURE, limit=2)["examples"] == 2


@pytest.mark.parametrize("line,problem", [
    ("{not json", r":2: not valid JSON"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 0}', r":2: 'endings' must be a list of 4 strings"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 7}', r":2: 'label' must be an integer"),
    ('{"endings": ["b", "c", "d", "e"], "label": 1}', r":2: 'ctx' must be a string"),
])
def test_hellaswag_malformed_lines_are_named(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    with open(FIXTURE) as f:
        first = f.readline()
    path.write_text(first + line + "\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + problem):
        evaluate.read_hellaswag(str(path))


def test_hellaswag_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="hellaswag_val.jsonl") as info:
        evaluate.read_hellaswag(str(tmp_path / "nope.jsonl"))
    assert str(tmp_path / "nope.jsonl") in str(info.value)


def test_fixture_is_hellaswag_format():
    with open(FIXTURE) as f:
        for line in f:
            ex = json.loads(line)
            assert ex["ctx"] == (ex["ctx_a"] + " " + ex["ctx_b"]).strip() and len(ex["endings"]) == 4
