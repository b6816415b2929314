"""Errors a user can fix. Each message says what is wrong and how to fix it; the CLIs print it as one line,
`error: ...`, and exit 1, while any other exception is a bug and keeps its traceback. Each class also is the
builtin exception it refines, so callers catch ValueError, FileNotFoundError, ... as usual."""


class UserError(Exception):
    pass


class UserValueError(UserError, ValueError):
    pass


class UserFileNotFoundError(UserError, FileNotFoundError):
    pass


class UserFileExistsError(UserError, FileExistsError):
    pass


class UserRuntimeError(UserError, RuntimeError):
    pass
