"""OpenAI's completions protocol: the request schema, errors in OpenAI's shape, and each choice's text as its
tokens arrive. fastapi and pydantic come with the serve extra: they are imported where used."""
from __future__ import annotations

from jaxgpt.serving.request import InvalidRequest

MAX_STOP = 4  # stop strings per request, as OpenAI


def request_model():
    """The pydantic schema of a completion request (built on first use)."""
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


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
          code: str | None = None, headers: dict | None = None):
    from fastapi.responses import JSONResponse
    return JSONResponse(error_body(message, param, kind, code), status, headers=headers)


def engine_failed_message(reason: str) -> str:
    return f"the engine failed ({reason}); the server is shutting down for a restart"


def engine_failed_error(reason: str):
    return error(503, engine_failed_message(reason), kind="server_error", code="engine_failed")


def invalid_request_error(e: InvalidRequest):
    return error(400, str(e), e.param)


def validation_error(problems: list[dict], fields):
    """The 400 for a body the schema refused (pydantic's errors, the first one told): malformed JSON, an unknown
    field (with the fields that exist), or a field's value."""
    first = problems[0] if problems else {}
    where = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return error(400, f"malformed JSON: {first.get('ctx', {}).get('error', 'cannot parse the body')}")
    if first.get("type") == "extra_forbidden":
        return error(400, f"unknown field {where[0]!r}: this server takes {sorted(fields)}", where[0])
    return error(400, f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid request')}",
                 where[0] if where else None)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise InvalidRequest(f"stop: up to {MAX_STOP} non-empty strings, got {stop!r}", "stop")
    return stop


def finish_reason(engine_reason: str) -> str:
    """OpenAI's finish_reason for the engine's: a cancelled choice here was stopped by a stop string."""
    return "stop" if engine_reason in ("stop", "cancelled") else engine_reason


class ChoiceText:
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
