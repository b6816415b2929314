"""The HTTP app in front of an Engine (FastAPI): completions as JSON or server-sent events, the model list,
/healthz and the page; and its run under uvicorn until a signal or the engine's failure (docs/serving.md)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
import uuid
from importlib import resources

from jaxgpt import sample
from jaxgpt.errors import UserRuntimeError, UserValueError
from jaxgpt.serving import protocol
from jaxgpt.serving.engine import Engine, EngineFailed
from jaxgpt.serving.middleware import MAX_REQUEST_BYTES, KeyAndBodyLimit
from jaxgpt.serving.request import ERROR, InvalidRequest, QueueFull, Request, Sampling


class Completion:
    """One completion in flight: an engine request per prompt (choice index = prompt index * n + choice, as
    OpenAI), the events their callbacks post to the event loop, and each choice's text."""

    def __init__(self, engine: Engine, tok, prompts: list[list[int]], sampling: Sampling, n: int, stop: list[str]):
        self.engine, self.n, self.prompt_tokens = engine, n, sum(len(p) for p in prompts)
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.choices = [protocol.ChoiceText(tok, stop) for _ in range(len(prompts) * n)]
        self.requests = [Request(p, sampling, n, on_token=self._poster("token", i * n),
                                 on_finish=self._poster("finish", i * n)) for i, p in enumerate(prompts)]

    def _poster(self, kind: str, first_choice: int):
        def post(choice, value):  # from the engine's thread
            if not self.loop.is_closed():  # a request the drain gave up on, finished after the server stopped
                self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, first_choice + choice, value))
        return post

    def submit(self) -> None:
        """Queues every prompt's request, or none of them: raises QueueFull or EngineFailed."""
        try:
            for r in self.requests:
                self.engine.submit(r)
        except (QueueFull, EngineFailed):
            for r in self.requests:
                self.engine.cancel(r)
            raise

    def cancel_unfinished(self) -> None:
        """The client went away, or the handler ended: nothing of these requests runs on."""
        for r in self.requests:
            if any(s.finish_reason is None for s in r.sequences):
                self.engine.cancel(r)

    async def pieces(self):
        """(choice, text, finish_reason or None) as the engine produces them; raises EngineFailed."""
        open_ = set(range(len(self.choices)))
        try:
            while open_:
                kind, c, value = await self.events.get()
                if c not in open_:
                    continue
                if kind == "token":
                    choice = self.choices[c]
                    text = choice.add(value)
                    if choice.stopped:
                        self.engine.cancel(self.requests[c // self.n], c % self.n)
                        open_.discard(c)
                        yield c, text, "stop"
                    elif text:
                        yield c, text, None
                else:
                    open_.discard(c)
                    if value == ERROR:
                        raise EngineFailed(self.engine.failure or "unknown")
                    yield c, self.choices[c].flush(), protocol.finish_reason(value)
        finally:
            self.cancel_unfinished()

    def usage(self) -> dict:
        completion_tokens = sum(len(c.tokens) for c in self.choices)
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=self.prompt_tokens + completion_tokens)

    async def answer(self, head: dict):
        """The whole completion as one JSON answer (or the 503 of a failed engine)."""
        finish = [None] * len(self.choices)
        try:
            async for c, _, reason in self.pieces():
                finish[c] = reason or finish[c]
        except EngineFailed as e:
            return protocol.engine_failed_error(e.reason)
        return dict(head, choices=[dict(text=ch.text, index=i, logprobs=None, finish_reason=finish[i])
                                   for i, ch in enumerate(self.choices)], usage=self.usage())

    async def stream(self, head: dict):
        """Server-sent events: a piece of one choice's text each, then usage and [DONE]; a failed engine ends the
        stream with an error event in OpenAI's shape, and no [DONE]."""
        try:
            async for c, text, reason in self.pieces():
                chunk = dict(head, choices=[dict(text=text, index=c, logprobs=None, finish_reason=reason)])
                yield f"data: {json.dumps(chunk)}\n\n"
            yield f"data: {json.dumps(dict(head, choices=[], usage=self.usage()))}\n\n"
            yield "data: [DONE]\n\n"
        except EngineFailed as e:
            body = protocol.error_body(protocol.engine_failed_message(e.reason), kind="server_error",
                                       code="engine_failed")
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            self.cancel_unfinished()


class Server:
    """The HTTP front of an Engine: parses and checks requests, turns tokens into text and events."""

    def __init__(self, engine: Engine, tok, name: str, weights: str = "float32", api_key: str | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES):
        self.engine, self.tok, self.name, self.weights = engine, tok, name, weights
        self.api_key, self.max_request_bytes = api_key, max_request_bytes
        self.created = int(time.time())

    def app(self):
        from fastapi import FastAPI
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse
        from starlette.exceptions import HTTPException

        app = FastAPI(title="jaxgpt", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(KeyAndBodyLimit, api_key=self.api_key, max_bytes=self.max_request_bytes)
        CompletionRequest = protocol.request_model()

        @app.exception_handler(RequestValidationError)
        async def invalid(_, e: RequestValidationError):
            return protocol.validation_error(e.errors(), CompletionRequest.model_fields)

        @app.exception_handler(HTTPException)
        async def http_error(_, e: HTTPException):
            return protocol.error(e.status_code, str(e.detail), kind="not_found_error" if e.status_code == 404
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
            return protocol.engine_failed_error(self.engine.failure)
        if body.model not in (None, self.name):
            return protocol.error(404, f"model {body.model!r} is not served here; GET /v1/models lists "
                                  f"{self.name!r}", "model", "not_found_error")
        try:
            stop = protocol.stop_strings(body.stop)
            prompts = self.prompts(body.prompt)
            sampling = self.sampling(body, prompts)
        except InvalidRequest as e:
            return protocol.invalid_request_error(e)
        completion = Completion(self.engine, self.tok, prompts, sampling, body.n, stop)
        try:
            completion.submit()
        except EngineFailed as e:
            return protocol.engine_failed_error(e.reason)
        except QueueFull as e:
            return protocol.error(429, str(e), kind="server_busy")
        head = dict(id=f"cmpl-{uuid.uuid4().hex[:24]}", object="text_completion", created=int(time.time()),
                    model=self.name)
        if not body.stream:
            return await completion.answer(head)
        from fastapi.responses import StreamingResponse
        return StreamingResponse(completion.stream(head), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def prompts(self, prompt) -> list[list[int]]:
        """A request's prompts as token ids; raises InvalidRequest."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise InvalidRequest("prompt is an empty list", "prompt")
        try:
            return [sample.encode_prompt(self.tok, p) if isinstance(p, str) else list(p) for p in prompt]
        except UserValueError as e:  # text the tokenizer cannot encode
            raise InvalidRequest(str(e), "prompt") from None

    def sampling(self, body, prompts: list[list[int]]) -> Sampling:
        """A request's settings, once the engine can run every prompt with them; raises InvalidRequest."""
        if len(prompts) * body.n > self.engine.max_batch:
            raise InvalidRequest(f"n={body.n} choices for {len(prompts)} prompt(s) exceed the server's max_batch "
                                 f"of {self.engine.max_batch}", "n")
        seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(4), "little")
        sampling = Sampling(max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                            top_p=body.top_p, seed=seed)
        for p in prompts:
            self.engine.check(p, sampling, body.n)
        return sampling


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


def run(app, engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
        sockets=None) -> None:
    """uvicorn until a signal or the engine's failure, then its graceful shutdown: the listening socket closes,
    open responses get `drain_timeout` seconds. Raises EngineFailed after that if the engine failed."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=max(1, round(drain_timeout))))
    done = threading.Event()

    def watch():  # the engine failed: every request has its error; stop taking new ones and exit
        while not done.is_set():
            if engine.failed.wait(0.2):
                server.should_exit = True
                return
    threading.Thread(target=watch, name="jaxgpt-watch", daemon=True).start()
    try:
        with _drained_means_done():
            server.run(sockets=sockets)
    finally:
        done.set()
    if engine.failure is not None:
        raise EngineFailed(engine.failure)


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
