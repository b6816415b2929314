"""Serve a model over HTTP: OpenAI-style completions, streamed as server-sent events, and a page to try them.

    python -m jaxgpt.serve --ckpt=out/shakespeare_char            # a training workdir or a model directory
    python -m jaxgpt.serve --hf=path/to/hf_gpt2 --weights=int8 --port=8000
    curl -N localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "ROMEO:", "max_tokens": 64, "temperature": 0.8, "stream": true}'

Endpoints: POST /v1/completions, GET /v1/models, GET /healthz, GET / (the page). Requests decode together in
jaxgpt/engine.py's continuous batches. Every bad request gets a 4xx JSON error in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}; a client that goes away mid-stream frees its rows at the next step.
With an API key (--api_key or JAXGPT_API_KEY) every endpoint but /healthz and the page wants `Authorization: Bearer
KEY`. If the engine fails, requests get 503s, the server drains and the process exits 1 for its supervisor to
restart; SIGTERM drains and exits 0 (docs/serving.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import signal
import threading
import time
import uuid
from importlib import resources

from absl import flags, logging

from jaxgpt import cli, engine, sample
from jaxgpt.errors import UserRuntimeError, UserValueError

MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_REQUEST_BYTES = 1 << 20  # request bodies above this get a 413, unread: a prompt of ~1M characters fits
KEY_VARIABLE = "JAXGPT_API_KEY"  # the environment variable holding the API key (--api_key overrides it)
OPEN_PATHS = ("/healthz", "/")  # served without the key: a supervisor's probe, and the page (it asks for the key)


def _request_model():
    """The pydantic schema of a completion request (built on first use: pydantic comes with the serve extra)."""
    from pydantic import BaseModel, ConfigDict, Field

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")  # an unknown field is an error, not silently ignored
        model: str | None = None  # the served model's id (the only one) or omitted
        prompt: str | list[int] | list[str] | list[list[int]] = ""  # text or token ids; a list of either: one each
        max_tokens: int = Field(16, ge=1)  # new tokens per choice; past the context a window slides
        temperature: float = Field(1.0, ge=0.0)  # 0 is greedy
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: int = Field(0, ge=0)  # an extension: 0 keeps every token
        n: int = Field(1, ge=1)  # choices per prompt
        seed: int | None = None  # choice i samples from (seed, i); omitted: a fresh seed
        stop: str | list[str] | None = None  # up to 4 strings that end a choice (not included in its text)
        stream: bool = False  # server-sent events, one per piece of text, then [DONE]
        user: str | None = None  # accepted, as OpenAI, and unused

    return CompletionRequest


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
          code: str | None = None, headers: dict | None = None):
    from fastapi.responses import JSONResponse
    return JSONResponse(error_body(message, param, kind, code), status, headers=headers)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def failed(reason: str):
    return error(503, f"the engine failed ({reason}); the server is shutting down for a restart", kind="server_error",
                 code="engine_failed")


class Guard:
    """ASGI middleware in front of the app: the API key, checked before anything of the request is read (401), then
    the body's size, checked before it is parsed (413), whether the client declared a Content-Length or sent
    chunks. Keys are compared in constant time and never logged."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.key, self.max_bytes = app, api_key.encode() if api_key else None, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # lower-case names
        if self.key and scope["path"] not in OPEN_PATHS and not self.authorized(headers.get(b"authorization")):
            missing = b"authorization" not in headers
            message = ("this server needs an API key: send the header `Authorization: Bearer KEY`" if missing
                       else "incorrect API key (expected `Authorization: Bearer KEY`)")
            return await error(401, message, kind="invalid_request_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    return await self.too_large(scope, receive, send)
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)

    def authorized(self, header: bytes | None) -> bool:
        scheme, _, token = (header or b"").partition(b" ")
        return hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"

    async def too_large(self, scope, receive, send):
        await error(413, f"the request body exceeds this server's limit of {self.max_bytes} bytes",
                    headers={"Connection": "close"})(scope, receive, send)


def _replay(body: bytes, receive):
    """An ASGI receive that gives the body already read, then the client's later messages (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


class Choice:
    """One choice's text as its tokens arrive: whole characters only, cut at the first stop string; what may still
    become a stop string is held back."""

    def __init__(self, tok, stop: list[str]):
        self.tok, self.stop, self.tokens, self.sent, self.text, self.stopped = tok, stop, [], 0, "", False

    def add(self, token: int) -> str:
        """The new text that can be sent; sets `stopped` when a stop string appeared."""
        self.tokens.append(token)
        try:
            text = self.tok.decode(self.tokens)
        except ValueError:  # an id past the tokenizer's vocabulary (a padded row the model learned to emit)
            self.tokens.pop()
            return ""
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        found = [i for s in self.stop if (i := text.find(s)) >= 0]
        if found:
            text, self.stopped, hold = text[:max(min(found), self.sent)], True, 0
        else:  # the longest end of the text that a stop string may still complete
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.text = text
        new = text[self.sent:len(text) - hold]
        self.sent += len(new)
        return new

    def flush(self) -> str:
        """At the end: the text held back for a stop string that never came."""
        new, self.sent = self.text[self.sent:], len(self.text)
        return new


class Server:
    """The HTTP front of an Engine: parses and checks requests, turns tokens into text and events."""

    def __init__(self, eng: engine.Engine, tok, name: str, weights: str = "float32", api_key: str | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES):
        self.engine, self.tok, self.name, self.weights = eng, tok, name, weights
        self.api_key, self.max_request_bytes = api_key, max_request_bytes
        self.created = int(time.time())

    def prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise UserValueError("prompt is an empty list")
        return [sample.encode_prompt(self.tok, p) if isinstance(p, str) else list(p) for p in prompt]

    def app(self):
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse
        from starlette.exceptions import HTTPException

        app = FastAPI(title="jaxgpt", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(Guard, api_key=self.api_key, max_bytes=self.max_request_bytes)
        CompletionRequest = _request_model()

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, e: RequestValidationError):
            problems = e.errors()
            first = problems[0] if problems else {}
            where = [str(x) for x in first.get("loc", ()) if x != "body"]
            if first.get("type") == "json_invalid":
                return error(400, f"malformed JSON: {first.get('ctx', {}).get('error', 'cannot parse the body')}")
            if first.get("type") == "extra_forbidden":
                return error(400, f"unknown field {where[0]!r}: this server takes "
                             f"{sorted(CompletionRequest.model_fields)}", where[0])
            field = where[0] if where else None
            return error(400, f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid request')}", field)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, e: HTTPException):
            return error(e.status_code, str(e.detail), kind="not_found_error" if e.status_code == 404
                         else "invalid_request_error")

        @app.get("/healthz")
        async def healthz():
            if self.engine.failure is not None:
                return JSONResponse({"status": "failed", "reason": self.engine.failure, "model": self.name}, 503)
            return {"status": "ok", "model": self.name, "weights": self.weights, **self.engine.stats()}

        @app.get("/v1/models")
        async def models():  # context_length and max_tokens (the most a request may ask for): the page's defaults
            return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                                "owned_by": "jaxgpt", "context_length": self.engine.config.block_size,
                                                "max_tokens": self.engine.max_tokens}]}

        @app.get("/", response_class=HTMLResponse)
        async def page():
            return resources.files("jaxgpt").joinpath("serve_page.html").read_text(encoding="utf-8")

        async def completions(body):
            return await self.complete(body)
        completions.__annotations__["body"] = CompletionRequest  # the class itself: it is local to this function
        app.post("/v1/completions")(completions)

        return app

    async def complete(self, body):
        if self.engine.failure is not None:
            return failed(self.engine.failure)
        if body.model not in (None, self.name):
            return error(404, f"model {body.model!r} is not served here; GET /v1/models lists {self.name!r}",
                         "model", "not_found_error")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            return error(400, f"stop: up to {MAX_STOP} non-empty strings, got {stop!r}", "stop")
        try:
            prompts = self.prompts(body.prompt)
            if len(prompts) * body.n > self.engine.max_batch:
                raise UserValueError(f"n={body.n} choices for {len(prompts)} prompt(s) exceed the server's "
                                     f"max_batch of {self.engine.max_batch}")
            seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(4), "little")
            sampling = engine.Sampling(max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                                       top_p=body.top_p, seed=seed)
            for p in prompts:
                self.engine.check(p, sampling, body.n)
        except UserValueError as e:
            return error(400, str(e), _param(str(e)))

        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        requests, choices = [], []
        for i, p in enumerate(prompts):
            base = i * body.n  # choice index = prompt index * n + choice, as OpenAI
            choices += [Choice(self.tok, stop) for _ in range(body.n)]

            def post(kind, c, value, base=base):
                if not loop.is_closed():  # a request the drain gave up on, finished after the server stopped
                    loop.call_soon_threadsafe(events.put_nowait, (kind, base + c, value))
            requests.append(engine.Request(p, sampling, body.n, on_token=lambda c, t, post=post: post("token", c, t),
                                           on_finish=lambda c, why, post=post: post("finish", c, why)))
        try:
            for r in requests:
                self.engine.submit(r)
        except (UserValueError, engine.EngineFailed) as e:
            for r in requests:
                self.engine.cancel(r)
            if isinstance(e, engine.EngineFailed):
                return failed(e.reason)
            return error(429, str(e), kind="server_busy")
        head = dict(id=f"cmpl-{uuid.uuid4().hex[:24]}", object="text_completion", created=int(time.time()),
                    model=self.name)

        def cleanup():  # the client went away, or the handler ended: nothing of these requests runs on
            for r in requests:
                if any(s.finish_reason is None for s in r.sequences):
                    self.engine.cancel(r)

        async def pieces():
            """(choice, text, finish_reason or None) as the engine produces them."""
            open_ = set(range(len(choices)))
            try:
                while open_:
                    kind, c, value = await events.get()
                    if c not in open_:
                        continue
                    if kind == "token":
                        text = choices[c].add(value)
                        if choices[c].stopped:
                            self.engine.cancel(requests[c // body.n], c % body.n)
                            open_.discard(c)
                            yield c, text, "stop"
                        elif text:
                            yield c, text, None
                    else:
                        open_.discard(c)
                        if value == "error":
                            raise engine.EngineFailed(self.engine.failure or "unknown")
                        yield c, choices[c].flush(), "stop" if value in ("stop", "cancelled") else value
            finally:
                cleanup()

        prompt_tokens = sum(len(p) for p in prompts)
        usage = lambda: dict(prompt_tokens=prompt_tokens, completion_tokens=sum(len(c.tokens) for c in choices),
                             total_tokens=prompt_tokens + sum(len(c.tokens) for c in choices))
        if not body.stream:
            finish = [None] * len(choices)
            try:
                async for c, _, reason in pieces():
                    finish[c] = reason or finish[c]
            except engine.EngineFailed as e:
                return failed(e.reason)
            return dict(head, choices=[dict(text=ch.text, index=i, logprobs=None, finish_reason=finish[i])
                                       for i, ch in enumerate(choices)], usage=usage())

        async def events_stream():
            try:
                async for c, text, reason in pieces():
                    chunk = dict(head, choices=[dict(text=text, index=c, logprobs=None, finish_reason=reason)])
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield f"data: {json.dumps(dict(head, choices=[], usage=usage()))}\n\n"
                yield "data: [DONE]\n\n"
            except engine.EngineFailed as e:  # the stream ends with an error event (OpenAI's shape), no [DONE]
                message = f"the engine failed ({e.reason}); the server is shutting down for a restart"
                yield f"data: {json.dumps(error_body(message, kind='server_error', code='engine_failed'))}\n\n"
            finally:
                cleanup()
        from fastapi.responses import StreamingResponse
        return StreamingResponse(events_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _param(message: str) -> str | None:
    for name in ("max_tokens", "prompt", "n="):
        if name in message:
            return name.rstrip("=")
    return None


def wait_until_serving(url: str, timeout: float = 300.0, process=None) -> None:
    """Returns once GET {url}/healthz answers 200 (a server just launched compiles and loads first); raises
    UserRuntimeError after `timeout` seconds, or once `process` (the server's subprocess.Popen) has exited."""
    import urllib.error
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise UserRuntimeError(f"the server exited with status {process.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise UserRuntimeError(f"{url} did not answer /healthz within {timeout:.0f} s")


def serve(model, tok, *, name: str, host: str, port: int, max_batch: int, weights: str, api_key: str | None = None,
          max_request_bytes: int = MAX_REQUEST_BYTES, max_tokens: int = engine.MAX_TOKENS,
          drain_timeout: float = 30.0, sockets=None):
    """Serves until SIGTERM or SIGINT, then drains (no new connections; running requests get up to
    `drain_timeout` seconds) and returns. Raises EngineFailed, after draining, if the engine failed."""
    eng = engine.Engine(model, max_batch=max_batch, eot_id=tok.eot, max_tokens=max_tokens).start()
    app = Server(eng, tok, name, weights, api_key, max_request_bytes).app()
    try:
        run(app, eng, host=host, port=port, drain_timeout=drain_timeout, sockets=sockets)
    finally:
        eng.stop()


def run(app, eng: engine.Engine, *, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
        sockets=None) -> None:
    """uvicorn until a signal or the engine's failure, then its graceful shutdown: the listening socket closes,
    open responses get `drain_timeout` seconds. Raises EngineFailed after that if the engine failed."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=max(1, round(drain_timeout))))
    done = threading.Event()

    def watch():  # the engine failed: every request has its error; stop taking new ones and exit
        while not done.is_set():
            if eng.failed.wait(0.2):
                server.should_exit = True
                return
    threading.Thread(target=watch, name="jaxgpt-watch", daemon=True).start()
    try:
        with _drained_means_done():
            server.run(sockets=sockets)
    finally:
        done.set()
    if eng.failure is not None:
        raise engine.EngineFailed(eng.failure)


@contextlib.contextmanager
def _drained_means_done():
    """uvicorn drains on SIGTERM or SIGINT, then raises the signal again with the handlers it found: no-ops here,
    so that a drained server returns and the process exits 0 (the default handlers would end it by the signal)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server other machines may reach with no API key, else None."""
    if api_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        loopback = False
    if loopback:
        return None
    return (f"--host={host} is reachable from other machines and no API key is set: anyone who reaches it can use "
            f"the model. Set {KEY_VARIABLE} (or --api_key) to require `Authorization: Bearer KEY`.")


def main(argv):
    if len(argv) > 1:
        raise UserValueError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserValueError(f"serving needs the serve extra: pip install -e '.[serve]' ({e})") from None
    from jaxgpt import loader, quantize
    logging.set_verbosity(logging.WARNING)
    if bool(f.ckpt) == bool(f.hf):
        raise UserValueError("give exactly one of --ckpt=DIR (jaxgpt model or workdir) or --hf=DIR (Hugging Face)")
    for flag in ("max_request_bytes", "max_tokens"):
        if f[flag].value < 1:
            raise UserValueError(f"--{flag}={f[flag].value} must be >= 1")
    api_key = f.api_key or os.environ.get(KEY_VARIABLE) or None
    if warning := exposure_warning(f.host, api_key):
        logging.warning(warning)
    model = loader.load(f"hf:{f.hf}" if f.hf else f"ckpt:{f.ckpt}", f.step, scan_layers=False)
    tok = sample.load_tokenizer(f.tokenizer, model, f.ckpt or f.hf)
    model = quantize.convert(model, f.weights)
    name = f.name or os.path.basename(os.path.normpath(f.ckpt or f.hf))
    print(f"serving {name} ({f.weights} weights, {tok.name} tokenizer, context {model.config.block_size}, up to "
          f"{f.max_batch} sequences at once{', API key required' if api_key else ''}) on http://{f.host}:{f.port}",
          flush=True)
    try:
        serve(model, tok, name=name, host=f.host, port=f.port, max_batch=f.max_batch, weights=f.weights,
              api_key=api_key, max_request_bytes=f.max_request_bytes, max_tokens=f.max_tokens,
              drain_timeout=f.drain_timeout)
    except engine.EngineFailed as e:  # the traceback is in the log above; a supervisor restarts on the status
        cli.fail(f"{e}; the server drained and exits for a restart")


def define_flags():
    flags.DEFINE_string("ckpt", None, "jaxgpt model directory or training workdir")
    flags.DEFINE_string("step", "latest", "a training workdir's checkpoint: latest, best (lowest val loss) or N")
    flags.DEFINE_string("hf", None, "local Hugging Face GPT-2 directory (config.json + model.safetensors)")
    flags.DEFINE_string("tokenizer", "", "'gpt2' or a data directory; empty: the tokenizer saved with the model")
    flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    flags.DEFINE_integer("port", 8000, "port to listen on")
    flags.DEFINE_enum("weights", "float32", ["float32", "bfloat16", "int8"], "the weights decoding runs on: "
                      "int8 is weight-only with a scale per output channel (jaxgpt/quantize.py)")
    flags.DEFINE_integer("max_batch", 32, "sequences decoded at once (cache rows); a power of two")
    flags.DEFINE_string("name", "", "the model id of /v1/models; empty: the directory's name")
    flags.DEFINE_string("api_key", None, f"require `Authorization: Bearer KEY` (every endpoint but /healthz and the "
                        f"page); default: ${KEY_VARIABLE}, which keeps the key out of the process list")
    flags.DEFINE_integer("max_request_bytes", MAX_REQUEST_BYTES, "request bodies above this get a 413, unread")
    flags.DEFINE_integer("max_tokens", engine.MAX_TOKENS, "the most new tokens a request may ask for per choice "
                         "(past the model's context, a window slides as in jaxgpt.sample)")
    flags.DEFINE_float("drain_timeout", 30.0, "on SIGTERM or SIGINT: seconds the running requests get to finish")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
