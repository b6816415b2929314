"""The server: continuous batching against jaxgpt.generate, the HTTP API (JSON, streams, errors, disconnects),
a bounded load test, and the page in a real headless browser. Servers bind 127.0.0.1 on a free port."""
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from jaxgpt import checkpoint, engine, generate, serve
from jaxgpt.model import GPTConfig, build
from jaxgpt.tokenizer import CharTokenizer

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n-"))
TOK = CharTokenizer(CHARS)
# init_std 0.5: logits far from ties, so greedy choices do not hang on rounding (the batch changes the rounding)
CONFIG = GPTConfig(vocab_size=64, valid_vocab_size=len(CHARS), block_size=96, n_layer=2, n_head=4, n_embd=64,
                   init_std=0.5)
TIMEOUT = 120  # seconds: a first request compiles the engine's shapes, slowly on a busy CPU


def get(url, **kw):
    return httpx.get(url, timeout=TIMEOUT, **kw)


def post(url, **kw):
    return httpx.post(url, timeout=TIMEOUT, **kw)


def stream(url, **kw):
    return httpx.stream("POST", url, timeout=TIMEOUT, **kw)


TEXTS = ["ROMEO:", "a", "To be, or not to be", "What light through yonder window breaks?", "Hm", "The quick brown fox"]


@pytest.fixture(scope="module")
def model():
    return build(CONFIG, seed=3)


def greedy(model, text, max_tokens, eot_id=None):
    return generate.generate(model, [TOK.encode(text)], max_new_tokens=max_tokens, temperature=0, eot_id=eot_id)[0]


def run_engine(eng, requests, timeout=120):
    """Submits (prompt, Sampling, n, delay) requests from this thread; -> {(request, choice): tokens}, reasons."""
    tokens, reasons, done = {}, {}, threading.Event()
    total = sum(n for _, _, n, _ in requests)

    def finish(key, why):
        reasons[key] = why
        if len(reasons) == total:
            done.set()
    for i, (prompt, sampling, n, delay) in enumerate(requests):
        time.sleep(delay)
        eng.submit(engine.Request(prompt, sampling, n,
                                  on_token=lambda c, t, i=i: tokens.setdefault((i, c), []).append(t),
                                  on_finish=lambda c, why, i=i: finish((i, c), why)))
    assert done.wait(timeout), f"{len(reasons)} of {total} sequences finished"
    return tokens, reasons


def test_engine_greedy_equals_generate_whatever_the_batch(model):
    """Greedy requests of every prompt length, beside sampled ones with every filter, arriving while others
    decode: each greedy choice is jaxgpt.generate's, each sampled one is what the same request gives alone."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, len(CHARS), int(n)).tolist() for n in rng.integers(1, 32, 8)]
    requests = []
    for i, p in enumerate(prompts):
        sampled = i % 2 == 1
        s = engine.Sampling(max_tokens=int(rng.integers(3, 20)), temperature=0.9 if sampled else 0.0,
                            top_k=[0, 5, 0, 20][i % 4], top_p=0.8 if i % 3 == 0 else 1.0, seed=i)
        requests.append((p, s, 2 if i % 5 == 0 else 1, 0.002 * (i % 3)))
    eng = engine.Engine(model, max_batch=8).start()
    try:
        tokens, reasons = run_engine(eng, requests)
    finally:
        eng.stop()
    assert eng.max_rows == 8 and len(eng.batch_rows) > 3  # full batches, and batches of other sizes
    greedy_ones = [i for i, (_, s, _, _) in enumerate(requests) if s.temperature == 0]
    longest = max(requests[i][1].max_tokens for i in greedy_ones)  # greedy tokens do not depend on how many follow
    reference = generate.generate(model, [requests[i][0] for i in greedy_ones], max_new_tokens=longest, temperature=0)
    for i, (_, s, n, _) in enumerate(requests):
        for c in range(n):
            assert reasons[(i, c)] == "length" and len(tokens[(i, c)]) == s.max_tokens
    for i, want in zip(greedy_ones, reference):
        for c in range(requests[i][2]):
            assert tokens[(i, c)] == want[:requests[i][1].max_tokens], i
    alone = engine.Engine(model, max_batch=2).start()
    try:
        for i in (1, 3, 5):  # top-k, top-p with top-k, plain
            p, s, n, _ = requests[i]
            assert run_engine(alone, [(p, s, n, 0)])[0][(0, 0)] == tokens[(i, 0)], i
    finally:
        alone.stop()
    assert tokens[(5, 0)] != tokens[(5, 1)] if requests[5][2] == 2 else True  # choices draw apart


def test_engine_runs_the_speedrun_blocks_as_generate_does():
    """QK-norm, value embeddings (looked up per new token), ReLU^2, rotary positions and soft-capped logits of an
    untied head, through the engine's prefill and slot caches: greedy choices, batched, are jaxgpt.generate's."""
    speedrun = build(GPTConfig(**{**CONFIG.__dict__, "n_layer": 2, "qk_norm": True, "value_embeds": 1, "mlp": "relu2",
                                  "positions": "rope", "logit_softcap": 5.0, "tie_embeddings": False}), seed=3)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, len(CHARS), int(n)).tolist() for n in (3, 17, 9, 30)]
    eng = engine.Engine(speedrun, max_batch=4).start()
    try:
        tokens, _ = run_engine(eng, [(p, engine.Sampling(max_tokens=12, temperature=0.0), 1, 0.002 * i)
                                     for i, p in enumerate(prompts)])
    finally:
        eng.stop()
    reference = generate.generate(speedrun, prompts, max_new_tokens=12, temperature=0)
    assert [tokens[(i, 0)] for i in range(len(prompts))] == reference
    assert len({tuple(r) for r in reference}) > 1  # not one degenerate stream


def test_engine_stops_at_end_of_text_and_cancels(model):
    eot = greedy(model, "ROMEO:", 1)[0]  # the first greedy token, declared end-of-text: the choice is empty
    eng = engine.Engine(model, max_batch=4, eot_id=eot).start()
    try:
        tokens, reasons = run_engine(eng, [(TOK.encode("ROMEO:"), engine.Sampling(max_tokens=20, temperature=0), 1, 0)])
        assert reasons == {(0, 0): "stop"} and (0, 0) not in tokens
        seen, finished = [], threading.Event()
        request = engine.Request(TOK.encode("a"), engine.Sampling(max_tokens=80, temperature=1.0, seed=1), 1,
                                 on_token=lambda c, t: seen.append(t), on_finish=lambda c, why: finished.set())
        eng.submit(request)
        while not seen:
            time.sleep(0.001)
        eng.cancel(request)
        assert finished.wait(10) and request.sequences[0].finish_reason == "cancelled" and len(seen) < 80
        assert eng.stats()["running"] == 0
    finally:
        eng.stop()


def test_choice_text_holds_back_stop_strings():
    choice = serve.Choice(TOK, ["END", "xy"])
    pieces = [choice.add(t) for t in TOK.encode("abcEN")]
    assert "".join(pieces) == "abc" and not choice.stopped  # "EN" may become "END"
    assert choice.add(TOK.encode("d")[0]) == "ENd" and not choice.stopped
    assert choice.add(TOK.encode("x")[0]) == "" and choice.add(TOK.encode("y")[0]) == "" and choice.stopped
    assert choice.text == "abcENd"


@pytest.fixture(scope="module")
def server(model):
    """A live server on 127.0.0.1 (a free port) in this process: (base url, its Engine)."""
    eng = engine.Engine(model, max_batch=32).start()
    app = serve.Server(eng, TOK, "tiny").app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield url, eng
    srv.should_exit = True
    thread.join(10)
    eng.stop()


def sse(lines) -> list:
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_http_completions_json_and_stream(server, model):
    url, _ = server
    assert get(f"{url}/healthz").json()["status"] == "ok"
    models = get(f"{url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["context_length"] == CONFIG.block_size
    assert "<textarea" in get(f"{url}/").text
    want = TOK.decode(greedy(model, "ROMEO:", 30))
    r = post(f"{url}/v1/completions", json=dict(prompt="ROMEO:", max_tokens=30, temperature=0))
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"] == [dict(text=want, index=0, logprobs=None, finish_reason="length")]
    assert body["usage"] == dict(prompt_tokens=6, completion_tokens=30, total_tokens=36)
    with stream(f"{url}/v1/completions",
                      json=dict(prompt="ROMEO:", max_tokens=30, temperature=0, stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(list(r.iter_lines()))
    assert len(events) > 5 and "".join(c["text"] for e in events for c in e["choices"]) == want
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 30
    # token ids in, several prompts and n choices out (index = prompt * n + choice); a seed repeats
    r = post(f"{url}/v1/completions", json=dict(prompt=[TOK.encode("a"), TOK.encode("Hm")], n=2, max_tokens=8,
                                                       temperature=1.0, top_k=10, seed=7)).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    again = post(f"{url}/v1/completions", json=dict(prompt=["a", "Hm"], n=2, max_tokens=8, temperature=1.0,
                                                           top_k=10, seed=7)).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in r["choices"]]


def test_http_stop_strings(server, model):
    url, _ = server
    full = TOK.decode(greedy(model, "To be", 40))
    stop = full[10:13]  # a string the greedy text holds
    r = post(f"{url}/v1/completions", json=dict(prompt="To be", max_tokens=40, temperature=0, stop=[stop]))
    choice = r.json()["choices"][0]
    assert choice == dict(text=full[:full.index(stop)], index=0, logprobs=None, finish_reason="stop")
    with stream(f"{url}/v1/completions", json=dict(prompt="To be", max_tokens=40, temperature=0,
                                                                 stop=stop, stream=True)) as r:
        events = sse(list(r.iter_lines()))
    assert "".join(c["text"] for e in events for c in e["choices"]) == full[:full.index(stop)]


@pytest.mark.parametrize("body, status, says", [
    ('{"prompt": "a", "max_tokens": 4', 400, "malformed JSON"),
    ('{"prompt": "a", "logprobs": 2}', 400, "unknown field 'logprobs'"),
    ('{"prompt": "' + "a" * 100 + '"}', 400, "exceeds the model's context of 96"),
    ('{"prompt": "a", "max_tokens": 0}', 400, "max_tokens"),
    ('{"prompt": "a", "max_tokens": 1000000}', 400, "plus max_tokens (1000000) exceeds"),
    ('{"prompt": "a", "temperature": -0.5}', 400, "temperature"),
    ('{"prompt": "a", "top_p": 0}', 400, "top_p"),
    ('{"prompt": "a", "n": 33}', 400, "max_batch of 32"),
    ('{"prompt": "a", "model": "gpt-4"}', 404, "'gpt-4' is not served here"),
    ('{"prompt": "\\u00e9t\\u00e9"}', 400, "not in this char tokenizer"),
    ('{"prompt": [1, 2, 999]}', 400, "outside the vocabulary"),
    ('{"prompt": "a", "stop": ["", "b"]}', 400, "stop"),
    ('[1, 2]', 400, "body"),
])
def test_http_bad_requests_get_one_json_error(server, body, status, says):
    url, eng = server
    r = post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"] and r.json()["error"]["type"]
    assert eng.stats()["waiting"] == 0


def test_http_client_disconnect_frees_its_rows(server, model):
    url, eng = server
    with stream(f"{url}/v1/completions", json=dict(prompt="a", max_tokens=90, n=4, temperature=1.0,
                                                                 stream=True)) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # streaming has begun; leave
    for _ in range(400):
        if eng.stats()["running"] == 0:
            break
        time.sleep(0.01)
    assert eng.stats()["running"] == 0
    r = post(f"{url}/v1/completions", json=dict(prompt="ROMEO:", max_tokens=5, temperature=0))
    assert r.json()["choices"][0]["text"] == TOK.decode(greedy(model, "ROMEO:", 5))


def test_http_load_32_clients_8_requests_each(server, model):
    """256 requests from 32 concurrent clients: no errors, every greedy answer right, requests batched."""
    url, eng = server
    want = {t: TOK.decode(greedy(model, t, 12)) for t in TEXTS}
    steps_before = eng.steps

    async def client(i, http):
        out = []
        for j in range(8):
            text = TEXTS[(i + j) % len(TEXTS)]
            r = await http.post(f"{url}/v1/completions", json=dict(prompt=text, max_tokens=12, temperature=0,
                                                                   stream=j % 2 == 1))
            assert r.status_code == 200, r.text
            got = (r.json()["choices"][0]["text"] if j % 2 == 0 else
                   "".join(c["text"] for e in sse(r.text.splitlines()) for c in e["choices"]))
            out.append(got == want[text])
        return out

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.wait_for(asyncio.gather(*(client(i, http) for i in range(32))), 120)
    results = asyncio.run(main())
    assert all(all(r) for r in results)
    assert eng.max_rows >= 16 and eng.steps - steps_before < 256 * 12 / 4  # steps shared by many requests


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return checkpoint.save_model(model, str(tmp_path_factory.mktemp("served") / "tiny"), TOK)


def launch(p):
    """A headless Chromium: the system's (Debian's chromium package), else playwright's own build."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        return p.chromium.launch(executable_path=path, args=["--no-sandbox"])
    except Exception as e:  # noqa: BLE001 - neither is installed on this machine
        if path is None and "Executable doesn't exist" in str(e):
            pytest.skip("no Chromium: apt-get install chromium, or python -m playwright install chromium")
        raise


@pytest.mark.slow
def test_page_streams_in_a_headless_browser(model, model_dir, tmp_path):
    """`python -m jaxgpt.serve` serves the page; Chromium types a prompt, clicks Generate and sees the greedy
    text arrive in pieces; a screenshot is saved."""
    from playwright.sync_api import sync_playwright
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.serve", f"--ckpt={model_dir}", f"--port={port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    url = f"http://127.0.0.1:{port}"
    try:
        serve.wait_until_serving(url, 300, proc)
        want = TOK.decode(greedy(model, "ROMEO:", 60))
        with sync_playwright() as p:
            chrome = launch(p)
            page = chrome.new_page()
            page.goto(url)
            page.fill("#prompt", "ROMEO:")
            page.fill("#max_tokens", "60")
            page.fill("#temperature", "0")
            page.evaluate("""window.updates = 0;
                new MutationObserver(() => window.updates++).observe(
                    document.getElementById('output'), {childList: true, subtree: true, characterData: true})""")
            page.click("#go")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=60_000)
            assert page.inner_text("#status").startswith("done: 60 tokens"), page.inner_text("#status")
            assert page.inner_text("#completion") == want.strip("\n") or page.text_content("#completion") == want
            assert page.text_content("#model") == "tiny"
            assert page.evaluate("window.updates") > 3  # the text came in pieces, as streamed
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            chrome.close()
        assert os.path.getsize(tmp_path / "page.png") > 10_000
    finally:
        proc.terminate()
        proc.wait(20)


def test_serve_cli_errors_are_one_line(tmp_path):
    for args, says in ((["--ckpt", str(tmp_path / "missing")], "no such model directory"),
                       (["--ckpt", str(tmp_path), "--weights=fp8"], "float32|bfloat16|int8")):
        r = subprocess.run([sys.executable, "-m", "jaxgpt.serve", *args], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and lines[-1].startswith("error: ") and says in lines[-1], r.stderr[-2000:]
