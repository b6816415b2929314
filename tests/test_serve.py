"""The server: continuous batching against jaxgpt.generate, the HTTP API (JSON, streams, errors, disconnects),
a bounded load test, and the page in a real headless browser. Servers bind 127.0.0.1 on a free port."""
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from jaxgpt import checkpoint, generate, sample, serve
from jaxgpt.model import GPTConfig, build
from jaxgpt.serving import app as serving_app
from jaxgpt.serving import engine, protocol
from jaxgpt.serving.request import Request, Sampling
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
        eng.submit(Request(prompt, sampling, n,
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
        s = Sampling(max_tokens=int(rng.integers(3, 20)), temperature=0.9 if sampled else 0.0,
                            top_k=[0, 5, 0, 20][i % 4], top_p=0.8 if i % 3 == 0 else 1.0, seed=i)
        requests.append((p, s, 2 if i % 5 == 0 else 1, 0.002 * (i % 3)))
    eng = engine.Engine(model, max_batch=8).start()
    try:
        tokens, reasons = run_engine(eng, requests)
    finally:
        eng.stop()
    assert eng.counters.max_rows == 8 and len(eng.counters.batch_rows) > 3  # full batches, and other sizes
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
        tokens, _ = run_engine(eng, [(p, Sampling(max_tokens=12, temperature=0.0), 1, 0.002 * i)
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
        tokens, reasons = run_engine(eng, [(TOK.encode("ROMEO:"), Sampling(max_tokens=20, temperature=0), 1, 0)])
        assert reasons == {(0, 0): "stop"} and (0, 0) not in tokens
        seen, finished = [], threading.Event()
        request = Request(TOK.encode("a"), Sampling(max_tokens=80, temperature=1.0, seed=1), 1,
                                 on_token=lambda c, t: seen.append(t), on_finish=lambda c, why: finished.set())
        eng.submit(request)
        while not seen:
            time.sleep(0.001)
        eng.cancel(request)
        assert finished.wait(10) and request.sequences[0].finish_reason == "cancelled" and len(seen) < 80
        assert eng.stats()["running"] == 0
    finally:
        eng.stop()


def test_engine_slides_past_the_context_as_generate(model):
    """Past block_size a row is prefilled again from its last half-block, as jaxgpt.generate's windows: greedy
    requests of prompts around the edges (one token, a block minus one, a whole block, more) running far past the
    context give generate's tokens, and a sampled one beside them its own tokens whatever the batch."""
    rng = np.random.default_rng(1)
    B = CONFIG.block_size
    requests = [(rng.integers(0, len(CHARS), n).tolist(), Sampling(max_tokens=int(m), temperature=0.0), 1, 0)
                for n, m in zip((1, B - 1, B, B + 50), rng.integers(B + 10, 2 * B + 30, 4))]
    sampled = (TOK.encode("ROMEO:"), Sampling(max_tokens=2 * B, temperature=0.9, top_k=20, seed=5), 1, 0)
    eng = engine.Engine(model, max_batch=4).start()  # 5 requests: one waits, and joins rows that slide
    try:
        tokens, reasons = run_engine(eng, [*requests, sampled])
        assert eng.stats()["slides"] >= 2 * len(requests)  # every row ran at least two windows past the first
        alone = run_engine(eng, [sampled])[0][(0, 0)]
    finally:
        eng.stop()
    for i, (prompt, s, _, _) in enumerate(requests):
        want = generate.generate(model, [prompt], max_new_tokens=s.max_tokens, temperature=0)[0]
        assert tokens[(i, 0)] == want and reasons[(i, 0)] == "length", len(prompt)
    assert alone == tokens[(len(requests), 0)] and len(alone) == 2 * B


def test_choice_text_holds_back_stop_strings():
    choice = protocol.ChoiceText(TOK, ["END", "xy"])
    pieces = [choice.add(t) for t in TOK.encode("abcEN")]
    assert "".join(pieces) == "abc" and not choice.stopped  # "EN" may become "END"
    assert choice.add(TOK.encode("d")[0]) == "ENd" and not choice.stopped
    assert choice.add(TOK.encode("x")[0]) == "" and choice.add(TOK.encode("y")[0]) == "" and choice.stopped
    assert choice.text == "abcENd"


@contextlib.contextmanager
def live(app):
    """Serves `app` on 127.0.0.1 (a free port) from a thread of this process; yields its base url."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(model):
    """A live server in this process: (base url, its Engine)."""
    eng = engine.Engine(model, max_batch=32).start()
    try:
        with live(serving_app.Server(eng, TOK, "tiny").app()) as url:
            yield url, eng
    finally:
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
    assert models["data"][0]["max_tokens"] == engine.MAX_TOKENS
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


def test_http_greedy_past_the_context_equals_sample(server, model, capsys):
    """A completion longer than the context: the text `jaxgpt.sample --temperature=0` prints for the prompt."""
    url, _ = server
    n = 2 * CONFIG.block_size + 20
    sample.sample(model, TOK, "ROMEO:", num_samples=1, seed=1337, max_new_tokens=n, temperature=0.0, top_k=200,
                  top_p=None)
    printed = capsys.readouterr().out
    want = printed[len("ROMEO:"):-len("\n" + "-" * 40 + "\n")]
    assert len(want) == n
    r = post(f"{url}/v1/completions", json=dict(prompt="ROMEO:", max_tokens=n, temperature=0))
    assert r.json()["choices"][0]["text"] == want


@pytest.mark.parametrize("body, status, says", [
    ('{"prompt": "a", "max_tokens": 4', 400, "malformed JSON"),
    ('{"prompt": "a", "logprobs": 2}', 400, "unknown field 'logprobs'"),
    ('{"prompt": "a", "max_tokens": 0}', 400, "max_tokens"),
    ('{"prompt": "a", "max_tokens": 1000000}', 400, "max_tokens (1000000) exceeds this server's limit of 4096"),
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

@pytest.mark.parametrize("body, param", [
    ('{"prompt": "a", "logprobs": 2}', "logprobs"),
    ('{"prompt": "a", "max_tokens": 0}', "max_tokens"),
    ('{"prompt": "a", "max_tokens": 1000000}', "max_tokens"),
    ('{"prompt": "a", "n": 33}', "n"),
    ('{"prompt": ["a", "b"], "n": 17}', "n"),
    ('{"prompt": "a", "model": "gpt-4"}', "model"),
    ('{"prompt": "\\u00e9t\\u00e9"}', "prompt"),
    ('{"prompt": [1, 2, 999]}', "prompt"),
    ('{"prompt": []}', "prompt"),
    ('{"prompt": "a", "stop": ["", "b"]}', "stop"),
])
def test_http_errors_name_the_field_at_fault(server, body, param):
    """An error's `param` is the request field at fault (OpenAI's error shape), whatever its message says."""
    url, _ = server
    r = post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


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
    steps_before = eng.counters.steps

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
    # steps shared by many requests
    assert eng.counters.max_rows >= 16 and eng.counters.steps - steps_before < 256 * 12 / 4


KEY = "sk-test-0123456789abcdef"


def test_http_api_key_and_body_limit(server):
    """With a key, requests without it (or with another) get a 401 before their body is read, so nothing reaches
    the queue; /healthz and the page stay open. Bodies over the limit get a 413 before they are parsed, with a
    Content-Length or chunked."""
    _, eng = server
    with live(serving_app.Server(eng, TOK, "tiny", api_key=KEY, max_request_bytes=4096).app()) as url:
        good = {"Authorization": f"Bearer {KEY}"}
        assert get(f"{url}/healthz").status_code == 200 and get(f"{url}/").status_code == 200
        steps, tokens = eng.counters.steps, eng.counters.tokens
        for headers in ({}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            r = post(f"{url}/v1/completions", content='{"prompt": "a", "max_tokens": ', headers=headers)  # bad JSON
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer" and KEY not in r.text
            assert get(f"{url}/v1/models", headers=headers).status_code == 401
        assert (eng.counters.steps, eng.counters.tokens, eng.stats()["waiting"]) == (steps, tokens, 0)  # none ran
        assert get(f"{url}/v1/models", headers=good).json()["data"][0]["id"] == "tiny"
        r = post(f"{url}/v1/completions", json=dict(prompt="a", max_tokens=3),
                 headers={"Authorization": f"bearer {KEY}"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        big = b'{"prompt": "' + b"a" * 5000  # malformed too: a 413, not a 400, says it was never parsed
        for content in (big, iter([big[:3000], big[3000:]])):  # Content-Length, then chunked without one
            r = post(f"{url}/v1/completions", content=content, headers=good)
            assert r.status_code == 413 and "limit of 4096 bytes" in r.json()["error"]["message"], r.text
        fits = json.dumps(dict(prompt="a" * 3000, max_tokens=2))
        r = post(f"{url}/v1/completions", content=fits, headers={**good, "Content-Type": "application/json"})
        assert r.status_code == 200, r.text


def test_exposure_warning_for_a_reachable_host_without_a_key():
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert "no API key is set" in serve.exposure_warning(host, None)
        assert serve.exposure_warning(host, KEY) is None
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert serve.exposure_warning(host, None) is None


def test_engine_failure_fails_visibly(model):
    """A fault injected into a decode step, while one request streams and another waits for rows: the stream ends
    with an error event, the waiting request and every later one get a 503 JSON error at once, /healthz says 503
    and why. Then the server's run (jaxgpt.serve.run) drains and raises, for the process to exit non-zero."""
    eng = engine.Engine(model, max_batch=2).start()
    gate, calls, original = threading.Event(), [], eng.runner.decode

    def failing_step(*args):
        calls.append(1)
        if len(calls) == 3:
            assert gate.wait(60)
            raise RuntimeError("injected fault in a decode step")
        return original(*args)
    eng.runner.decode = failing_step
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    outcome = {}

    def run():
        try:
            serving_app.run(serving_app.Server(eng, TOK, "tiny").app(), eng, sockets=[sock], drain_timeout=10)
        except engine.EngineFailed as e:
            outcome["failed"] = e.reason
    server_thread = threading.Thread(target=run, daemon=True)
    server_thread.start()
    try:
        serving_app.wait_until_serving(url, 60)
        with stream(f"{url}/v1/completions", json=dict(prompt="a", n=2, max_tokens=50, stream=True)) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")  # running, both rows taken
            queued = {}
            waiter = threading.Thread(target=lambda: queued.update(r=post(f"{url}/v1/completions",
                                                                          json=dict(prompt="b", max_tokens=5))))
            waiter.start()
            for _ in range(1000):
                if eng.stats()["waiting"] == 1:
                    break
                time.sleep(0.01)
            assert eng.stats()["waiting"] == 1
            start = time.monotonic()
            gate.set()
            rest = [line for line in lines if line.startswith("data: ")]
        assert "[DONE]" not in rest[-1]
        failure = json.loads(rest[-1][len("data: "):])["error"]
        assert failure["type"] == "server_error" and "injected fault in a decode step" in failure["message"]
        waiter.join(30)
        assert queued["r"].status_code == 503 and "injected fault" in queued["r"].json()["error"]["message"]
        assert time.monotonic() - start < 10
        # the server drains and stops: its run raises (main turns that into exit status 1) and the port closes
        server_thread.join(30)
        assert outcome["failed"] == "RuntimeError: injected fault in a decode step"
        with pytest.raises(httpx.ConnectError):
            get(f"{url}/healthz")
    finally:
        gate.set()
        eng.stop()


def test_failed_engine_answers_503(model):
    """/healthz and new requests once the engine has failed (a server that has not yet exited)."""
    eng = engine.Engine(model, max_batch=2).start()
    eng.runner.decode = lambda *args: 1 / 0
    try:
        with live(serving_app.Server(eng, TOK, "tiny").app()) as url:
            r = post(f"{url}/v1/completions", json=dict(prompt="a", max_tokens=5, stream=True))
            assert "ZeroDivisionError" in r.text and "[DONE]" not in r.text
            health = get(f"{url}/healthz")
            assert health.status_code == 503 and health.json()["reason"] == "ZeroDivisionError: division by zero"
            start = time.monotonic()
            r = post(f"{url}/v1/completions", json=dict(prompt="a", max_tokens=5))
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
            assert time.monotonic() - start < 5
    finally:
        eng.stop()


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


def start_server(model_dir, *args, log, key: str | None = None):
    """`python -m jaxgpt.serve` on a free port of 127.0.0.1, its output to the file `log` -> (process, base url);
    its API key from the environment."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **({serve.KEY_VARIABLE: key} if key else {})}
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.serve", f"--ckpt={model_dir}", f"--port={port}", *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_page_defaults_stream_on_a_64_token_model_in_a_headless_browser(tmp_path):
    """A first use: a model of a 64-token context served with an API key. Chromium opens the page, which asks for
    the key, reads the model's context, and with its defaults (128 tokens, past the context) streams text for
    "ROMEO:"; greedy, its text is jaxgpt.sample's. A screenshot is saved."""
    from playwright.sync_api import sync_playwright
    small = build(dataclasses.replace(CONFIG, block_size=64), seed=3)
    log = open(tmp_path / "server.log", "w")
    proc, url = start_server(checkpoint.save_model(small, str(tmp_path / "tiny64"), TOK), log=log, key=KEY)
    try:
        serving_app.wait_until_serving(url, 300, proc)
        with sync_playwright() as p:
            chrome = launch(p)
            page = chrome.new_page()
            page.goto(url)
            page.wait_for_selector("#api_key", state="visible", timeout=30_000)  # the server asked for a key
            page.fill("#api_key", KEY)
            page.focus("#prompt")  # leaving the field commits the key
            page.wait_for_function("document.getElementById('model').textContent === 'tiny64'", timeout=30_000)
            assert "context: 64 tokens" in page.inner_text("#context")
            page.fill("#prompt", "ROMEO:")
            page.evaluate("""window.updates = 0;
                new MutationObserver(() => window.updates++).observe(
                    document.getElementById('output'), {childList: true, subtree: true, characterData: true})""")
            page.click("#go")  # the page's defaults: 128 tokens at temperature 0.8, top-k 200
            done = "document.getElementById('status').textContent.startsWith('done')"
            page.wait_for_function(done, timeout=120_000)
            assert page.inner_text("#status").startswith("done: 128 tokens"), page.inner_text("#status")
            assert len(page.text_content("#completion")) == 128 and page.evaluate("window.updates") > 3
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            page.fill("#temperature", "0")
            page.click("#go")
            page.wait_for_function(done, timeout=120_000)
            want = TOK.decode(generate.generate(small, [TOK.encode("ROMEO:")], max_new_tokens=128, temperature=0)[0])
            assert page.text_content("#completion") == want
            chrome.close()
        assert os.path.getsize(tmp_path / "page.png") > 10_000
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_sigterm_drains_then_exits_0_and_the_key_stays_out_of_the_output(model_dir, tmp_path):
    """SIGTERM while a stream runs: new connections are refused, the stream finishes, the process exits 0. The
    API key (and a wrong one sent) never appear in what the server printed."""
    wrong = "sk-wrong-" + KEY[::-1]
    with open(tmp_path / "server.log", "w") as log:
        proc, url = start_server(model_dir, "--drain_timeout=60", log=log, key=KEY)
        good = {"Authorization": f"Bearer {KEY}"}
        try:
            serving_app.wait_until_serving(url, 300, proc)
            assert post(f"{url}/v1/completions", json=dict(prompt="a"),
                        headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
            assert post(f"{url}/v1/completions", json=dict(prompt="a", max_tokens=2), headers=good).status_code == 200
            n, lines = 1500, []

            def read():
                with stream(f"{url}/v1/completions", json=dict(prompt="ROMEO:", max_tokens=n, temperature=0,
                                                               stream=True), headers=good) as r:
                    lines.extend(r.iter_lines())
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            for _ in range(3000):
                if lines:
                    break
                time.sleep(0.01)
            assert lines, "the stream did not start"
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            refused = False
            for _ in range(200):
                try:
                    httpx.get(f"{url}/healthz", timeout=2)
                except (httpx.ConnectError, httpx.RemoteProtocolError):  # closed port, or closed unanswered
                    refused = True
                    break
                time.sleep(0.05)
            assert refused and reader.is_alive()  # no new connections while the running stream goes on
            reader.join(120)
            events = sse(lines)
            assert events[-1]["usage"]["completion_tokens"] == n
            assert events[-2]["choices"][0]["finish_reason"] == "length"
            assert proc.wait(60) == 0 and time.monotonic() - signalled < 60
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    output = (tmp_path / "server.log").read_text()
    assert "API key required" in output and KEY not in output and wrong not in output


def test_serve_cli_errors_are_one_line(tmp_path):
    for args, says in ((["--ckpt", str(tmp_path / "missing")], "no such model directory"),
                       (["--ckpt", str(tmp_path), "--weights=fp8"], "float32|bfloat16|int8")):
        r = subprocess.run([sys.executable, "-m", "jaxgpt.serve", *args], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and lines[-1].startswith("error: ") and says in lines[-1], r.stderr[-2000:]
