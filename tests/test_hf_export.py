"""Complete Hugging Face exports: `transformers.pipeline` loads them offline and its greedy text is jaxgpt's."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

import torch_bridge
from jaxgpt import checkpoint, generate, sample, tokenizer
from torch_bridge.__main__ import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = tokenizer.GPT2_VOCAB_SIZE - 1
CHARS = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"))

PIPELINE = """
import json, sys, transformers
out = {}
for name, directory, prompt, n in json.loads(sys.argv[1]):
    pipe = transformers.pipeline("text-generation", model=directory)
    result = pipe(prompt, do_sample=False, max_new_tokens=n, return_tensors=True)[0]["generated_token_ids"]
    out[name] = {"ids": [int(t) for t in result], "text": pipe.tokenizer.decode(result),
                 "prompt_ids": pipe.tokenizer(prompt)["input_ids"]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_hf_gpt2):
    """A GPT-2 BPE model and a char model, saved as jaxgpt model dirs and exported by the CLI to hf: dirs."""
    root = tmp_path_factory.mktemp("export")
    models = {}
    # a wide init keeps greedy choices far from ties, so fp32 rounding cannot flip one
    bpe = torch_bridge.from_hf(make_hf_gpt2(vocab_size=50257, bos_token_id=EOT, eos_token_id=EOT,
                                            initializer_range=0.3))
    checkpoint.save_model(bpe, str(root / "bpe"))  # no tokenizer saved: the export defaults to GPT-2 BPE
    char_tok = tokenizer.CharTokenizer(CHARS)
    char = torch_bridge.from_hf(make_hf_gpt2(vocab_size=len(CHARS), bos_token_id=None, eos_token_id=None,
                                             initializer_range=0.3, seed=1))
    checkpoint.save_model(char, str(root / "char"), tokenizer=char_tok)  # the export finds it there
    for name, m in (("bpe", bpe), ("char", char)):
        with contextlib.redirect_stdout(io.StringIO()):
            cli_main(["export", "--ckpt", str(root / name), "--to", f"hf:{root / name}_hf"])
        models[name] = m
    return root, models


def test_export_writes_tokenizer_and_generation_config(exported):
    root, _ = exported
    for name in ("bpe", "char"):
        files = set(os.listdir(root / f"{name}_hf"))
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json"} <= files, files
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(root / "bpe_hf"))
    gen = json.loads((root / "bpe_hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == EOT and gen["top_k"] == 200 and gen["temperature"] == 0.8
    assert "eos_token_id" not in json.loads((root / "char_hf" / "generation_config.json").read_text())
    # jaxgpt reads the tokenizers back from the exported dirs
    assert isinstance(tokenizer.stored_with(f"hf:{root / 'bpe_hf'}"), tokenizer.GPT2Tokenizer)
    assert tokenizer.stored_with(str(root / "char_hf")).chars == CHARS


@pytest.mark.slow
def test_pipeline_greedy_equals_jaxgpt_sample(exported):
    root, models = exported
    cases = [("bpe", str(root / "bpe_hf"), "The quick brown fox", 24),
             ("char", str(root / "char_hf"), "First Citizen:\n", 40)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PIPELINE, json.dumps(cases)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    hf = json.loads(done.stdout.strip().splitlines()[-1])
    for name, _, prompt, n in cases:
        m = models[name]
        tok = sample.load_tokenizer("", m, str(root / name))  # as `python -m jaxgpt.sample --ckpt=DIR` finds it
        prompt_ids = sample.encode_prompt(tok, prompt)
        assert hf[name]["prompt_ids"] == prompt_ids, name
        ours = generate.generate(m, [prompt_ids], max_new_tokens=n, temperature=0, eot_id=tok.eot)[0]
        theirs = hf[name]["ids"][len(prompt_ids):]
        if tok.eot is not None and theirs[-1:] == [tok.eot]:
            theirs = theirs[:-1]  # HF keeps the end-of-text token it stopped at; jaxgpt does not emit it
        assert len(ours) > n // 2 and ours == theirs, name
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            sample.sample(m, tok, prompt, num_samples=1, seed=0, max_new_tokens=n, temperature=0)
        assert out.getvalue() == prompt + tok.decode(ours) + "\n" + "-" * 40 + "\n", name
        assert hf[name]["text"] == tok.decode(hf[name]["ids"]), name  # and HF decodes as jaxgpt does


def test_export_without_a_known_tokenizer_is_a_clear_error(tmp_path, capsys, make_hf_gpt2):
    m = torch_bridge.from_hf(make_hf_gpt2())  # 100 tokens, no tokenizer saved
    checkpoint.save_model(m, str(tmp_path / "m"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--ckpt", str(tmp_path / "m"), "--to", f"hf:{tmp_path / 'hf'}"])
    assert exit_info.value.code == 1
    assert "no tokenizer saved with it and its 100 tokens are not GPT-2's: pass --tokenizer" in capsys.readouterr().err
