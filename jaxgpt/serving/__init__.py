"""Serving (docs/serving.md), kept apart as nano-vllm keeps it:

request      the request, sampling and sequence types (plain data)
scheduler    the policy in plain Python: admission, sliding past the context, finishing, cancellation
model_runner the device side: the KV caches and the jitted prefill and decode
engine       the thread whose step reads schedule -> run -> postprocess
protocol     OpenAI's completions: the request schema, errors, choice text
middleware   the API key and the body limit, before a request is read
app          the HTTP app (FastAPI) and its run under uvicorn

Nothing is imported here, so that the scheduler loads without jax.
"""
