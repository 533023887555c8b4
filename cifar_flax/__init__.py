"""cifar_flax: transfer learning on small images with a pretrained Flax ResNet50."""

import contextlib
import os
import sys
import time
from typing import Any, Callable, Iterator

__version__ = "0.2.0"


class UserError(Exception):
    """A problem the user can fix (a config field, a file or folder, the data, the weights, a run
    that diverged): the message is one line naming the thing that is wrong and the fix. The
    commands print it as ``error: <message>`` and exit with status 1 (cli.py); it is the only
    exception they treat as the user's."""


@contextlib.contextmanager
def user_errors(message: Callable[[Exception], str],
                *exception_types: type[Exception]) -> Iterator[None]:
    """``with user_errors(lambda e: f"cannot read {path} ({brief(e)})", OSError, ValueError):``
    one library call at an I/O boundary (a file, an import, a flag's text): an exception of
    ``exception_types`` it raises becomes the UserError ``message(exception)``: the one line
    that names what is wrong and the fix, raised ``from None`` (a traceback shows that line, not
    the library's internals). The one place such an exception turns into the user's error. A
    UserError raised inside is one already: it passes unchanged, unless UserError is one of
    ``exception_types`` (to put what was being done before its message)."""
    try:
        yield
    except exception_types as error:
        if isinstance(error, UserError) and UserError not in exception_types:
            raise
        raise UserError(message(error)) from None


def brief(text: object, limit: int = 200) -> str:
    """The first line of ``text`` (an exception's message, say) for a one-line message: white
    space folded, cut at a word boundary after at most ``limit`` characters, "..." where cut."""
    lines = str(text).strip().splitlines()
    line = " ".join(lines[0].split()) if lines else ""
    if len(line) <= limit:
        return line
    head = line[:limit + 1]
    cut = head.rsplit(" ", 1)[0] if " " in head else line.split(" ", 1)[0]
    return cut.rstrip(" ,;:") + "..."


@contextlib.contextmanager
def atomic_file(path: Any) -> Iterator[Any]:
    """``with atomic_file(path) as tmp:`` write the file ``tmp`` (a hidden name beside ``path``,
    of the same path type: pathlib or etils.epath); when the block ends without an exception
    ``tmp`` replaces ``path`` in one rename, so ``path`` is never seen half written. On an
    exception ``tmp`` is removed and ``path`` is left as it was. The one atomic file write of
    the package (a command's output file, a cache file)."""
    tmp = path.parent / f".{path.name}.tmp.{os.getpid()}.{time.time_ns()}"
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# The commands' start-up (run/startup.py), after the package's own names are defined. Python sets
# sys.argv[0] to "-m" while it imports the packages of the module that ``python -m
# cifar_flax.<command>`` launches (runpy; the module's path once it runs), so this runs before the
# command module's imports bring TensorFlow in: a Ctrl-C during those slow imports is one line,
# TensorFlow starts quietly and off every accelerator. A plain ``import cifar_flax`` (a library
# user, the tests, another tool's ``-m``, which imports cifar_flax only once its module runs) does
# none of it.
if getattr(sys, "argv", [])[:1] == ["-m"]:  # (Embedded interpreters may lack argv.)
    from cifar_flax.run import startup

    startup.start()
