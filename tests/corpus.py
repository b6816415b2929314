"""Text for tests, made at run time: the docstrings of Python's builtins and a few standard-library modules, English
prose with structure to learn, the same on every machine with the same Python. Nothing is read from outside the
repository (tinyshakespeare only through JAXGPT_TINYSHAKESPEARE, for the test that compares with nanoGPT)."""
import functools
import inspect
import os

import pytest

MODULES = ("builtins", "collections", "itertools", "functools", "os", "re", "json", "pathlib", "string", "textwrap",
           "argparse", "random", "statistics", "datetime")


@functools.cache
def _docstrings() -> str:
    parts = []
    for name in MODULES:
        module = __import__(name)
        parts += [doc for attr in sorted(dir(module)) if not attr.startswith("_")
                  if (doc := inspect.getdoc(getattr(module, attr, None)))]
    return "\n\n".join(parts)


def text(n_chars: int) -> str:
    """n_chars characters of the corpus (repeated if it is shorter)."""
    corpus = _docstrings()
    return (corpus * (n_chars // len(corpus) + 1))[:n_chars]


def write(path, n_chars: int) -> str:
    path.write_text(text(n_chars), encoding="utf-8")
    return str(path)


def tinyshakespeare() -> str:
    """The path JAXGPT_TINYSHAKESPEARE names; the calling test is skipped when it is unset or missing."""
    path = os.environ.get("JAXGPT_TINYSHAKESPEARE", "")
    if not os.path.isfile(path):
        pytest.skip("set JAXGPT_TINYSHAKESPEARE to a copy of tinyshakespeare's input.txt (1,115,394 bytes) to "
                    "compare token counts with nanoGPT's")
    return path
