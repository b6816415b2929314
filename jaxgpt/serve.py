"""Serve a model over HTTP: OpenAI-style completions, streamed as server-sent events, and a page to try them.

    python -m jaxgpt.serve --ckpt=out/shakespeare_char            # a training workdir or a model directory
    python -m jaxgpt.serve --hf=path/to/hf_gpt2 --weights=int8 --port=8000
    curl -N localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "ROMEO:", "max_tokens": 64, "temperature": 0.8, "stream": true}'

Endpoints: POST /v1/completions, GET /v1/models, GET /healthz, GET / (the page). This module is the command line;
the server is jaxgpt/serving/ (the engine's continuous batches, the OpenAI protocol, the HTTP app). Every bad
request gets a 4xx JSON error in OpenAI's shape, {"error": {"message", "type", "param", "code"}}; a client that
goes away mid-stream frees its rows at the next step. With an API key (--api_key or JAXGPT_API_KEY) every endpoint
but /healthz and the page wants `Authorization: Bearer KEY`. If the engine fails, requests get 503s, the server
drains and the process exits 1 for its supervisor to restart; SIGTERM drains and exits 0 (docs/serving.md).
"""
from __future__ import annotations

import ipaddress
import os

from absl import flags, logging

from jaxgpt import cli, sample
from jaxgpt.errors import UserValueError
from jaxgpt.serving.app import Server, run
from jaxgpt.serving.engine import MAX_TOKENS, Engine, EngineFailed
from jaxgpt.serving.middleware import MAX_REQUEST_BYTES

KEY_VARIABLE = "JAXGPT_API_KEY"  # the environment variable holding the API key (--api_key overrides it)


def serve(model, tok, *, name: str, host: str, port: int, max_batch: int, weights: str, api_key: str | None = None,
          max_request_bytes: int = MAX_REQUEST_BYTES, max_tokens: int = MAX_TOKENS,
          drain_timeout: float = 30.0, sockets=None):
    """Serves until SIGTERM or SIGINT, then drains (no new connections; running requests get up to
    `drain_timeout` seconds) and returns. Raises EngineFailed, after draining, if the engine failed."""
    engine = Engine(model, max_batch=max_batch, eot_id=tok.eot, max_tokens=max_tokens).start()
    app = Server(engine, tok, name, weights, api_key, max_request_bytes).app()
    try:
        run(app, engine, host=host, port=port, drain_timeout=drain_timeout, sockets=sockets)
    finally:
        engine.stop()


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
    except EngineFailed as e:  # the traceback is in the log above; a supervisor restarts on the status
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
    flags.DEFINE_integer("max_tokens", MAX_TOKENS, "the most new tokens a request may ask for per choice "
                         "(past the model's context, a window slides as in jaxgpt.sample)")
    flags.DEFINE_float("drain_timeout", 30.0, "on SIGTERM or SIGINT: seconds the running requests get to finish")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
