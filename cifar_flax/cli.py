"""The command boundary every ``python -m cifar_flax.<command>`` shares: flags, one error handler,
signals, a quiet start-up.

- Flags: absl with ml_collections ``config_flags`` for every command; each command keeps its
  flags in its own ``FlagValues`` (commands can be called in one process, as the tests do).
  Positional arguments come through absl's argv. ``--help``: the command's one line (its module
  docstring's first paragraph), where the config fields are documented (config.py), its flags.
  A slip is one line, found before JAX starts: an unknown or misspelled flag or
  ``--config.field`` (with the near name), an index out of range
  (``--config.phases[5].lr``), a value of the wrong type, a config file that is not there (with
  where it was looked for, and the project's own ``configs/`` file when a relative path was given
  from another directory).
- One handler (:func:`run`): a UserError prints ``error: <one line>`` and exits 1; an
  interrupted training run prints how to resume (interrupts.Interrupted); an OSError outside the
  checkpoints (a full disk, a permission) is one line too. Nothing else is caught.
- Signals: Ctrl-C or SIGTERM outside the training steps ends the command with one line
  (run/interrupts.py); after the command finished, they are ignored (a finished command
  exits 0).
- Quiet start-up (run/startup.py, begun by the package's ``__init__`` as Python launches the
  command): TensorFlow's import-time C++ notices, JAX's backend probe and Orbax's per-save lines
  do not reach the user; TensorFlow is kept off every accelerator.
"""

from __future__ import annotations

import difflib
import os
import re
import signal
import sys
from typing import Any, Callable, Sequence

from absl import flags, logging
from ml_collections import config_flags

from cifar_flax import UserError
from cifar_flax.run import interrupts, startup

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # configs/ lives here.


def run(main: Callable[[list[str]], str | None], flag_values: flags.FlagValues,
        argv: Sequence[str] | None = None, progress: bool = False,
        interrupted: str = interrupts.NOTHING_WRITTEN) -> int:
    """Parse ``argv`` (default: sys.argv) into ``flag_values``, then ``main(positional args)``;
    the command's exit status. ``main`` returns the command's last line (what it made, where),
    printed once the work is done and a late Ctrl-C can change nothing. With ``argv`` given (a
    call in-process, as the tests make) the signal handlers are put back afterwards.
    ``progress``: show the INFO log lines (training's phases, steps and input shards; the
    commands parse their own flags, so absl's --verbosity does not apply). ``interrupted``: what
    a signal from here on says happened to the work (``Interrupted (Ctrl-C): <interrupted>.``;
    during the command's imports, before it, the start-up's: run/startup.py)."""
    previous, verbosity = interrupts.exit_on_signal(interrupted), logging.get_verbosity()
    try:
        args = parse_flags(flag_values, [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
                           description(sys.modules.get(main.__module__)))
        startup.prepare_runtime()
        if progress:
            logging.set_verbosity(logging.INFO)
        done = main(args)
    except UserError as e:
        return _fail(f"error: {_one_line(str(e))}")
    except interrupts.Interrupted as e:
        print(e, flush=True)
        return e.status
    except OSError as e:  # A disk or permission problem outside the checkpoints.
        return _fail(f"error: {type(e).__name__}: {_one_line(str(e.strerror or e))}"
                     f"{f' ({e.filename})' if e.filename else ''}; what was saved before is "
                     "intact: fix that (free space, permissions) and rerun the same command.")
    finally:
        logging.set_verbosity(verbosity)
        if argv is None:  # The command is done: a late Ctrl-C changes nothing any more.
            for sig in interrupts.SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
        else:
            interrupts.restore(previous)
    if done:
        print(done, flush=True)
    return 0


def exit(status: int) -> None:  # noqa: A001 - the commands' ``cli.exit(cli.run(...))``.
    """End the command with ``status``; a failed one at once (``os._exit``), so that its error
    line stays the last thing printed (no teardown noise of background threads after it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status:
        os._exit(status)
    sys.exit(0)


def _fail(line: str) -> int:
    print(line, file=sys.stderr, flush=True)
    return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---- flags and config files ----


CONFIG_DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
HELP_CONFIG = (f"Config fields (--config.<field>=value; a run's config.json): each one, its "
               f"default and meaning, is documented in {CONFIG_DOC}.")


def description(module: Any) -> str:
    """The command's one-line description for ``--help``: the first paragraph of its module
    docstring, on one line (without reST's markup)."""
    doc = (getattr(module, "__doc__", None) or "").strip()
    first = _one_line(doc.split("\n\n")[0]).replace("``", "")
    return f"{first.rstrip(':')}." if first.endswith(":") else first


def parse_flags(flag_values: flags.FlagValues, argv: list[str], about: str = "") -> list[str]:
    """absl's parsing of ``argv`` into ``flag_values`` (and absl's own logging flags); returns
    argv[0] and the positional arguments. ``--help`` prints ``about`` (the command's one line),
    where the config fields are documented and the command's flags, and exits 0; every slip is
    a UserError of one line (an unknown flag with the near name, as for ``--config.`` fields)."""
    if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:]):
        print("\n\n".join(filter(None, [about, HELP_CONFIG, flag_values.get_help().strip("\n")])),
              flush=True)
        raise SystemExit(0)
    flag_values.unparse_flags()  # A second call in one process starts from the defaults.
    try:
        if id(flag_values) in _CONFIG_FLAGS:  # Its --config.<field> overrides come from argv.
            _define_config(flag_values, *_CONFIG_FLAGS[id(flag_values)], argv)
        unknown = unknown_flag_error(argv, flag_values)
        if unknown:  # Before absl's checks: a misspelled required flag is named as misspelled.
            raise UserError(unknown)
        rest = flags.FLAGS(flag_values(argv, known_only=True))
        for name in _config_flag_names(flag_values):
            if flag_values[name].value is not None:
                flag_values[name].value.keys()  # A config file that failed to load raises here.
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - every parsing failure is a user's slip.
        raise UserError(describe_flag_error(e, argv, flag_values)) from None
    left = [a for a in rest[1:] if a.startswith("-")]  # (What absl left: a flag it lacks.)
    if left:
        raise UserError(f"unknown flag {left[0]}; --help lists this command's flags.")
    return rest


def near(name: str, names: Sequence[str]) -> str | None:
    """The one of ``names`` that ``name`` most likely misspells (difflib), or None."""
    found = difflib.get_close_matches(name, list(names), 1, 0.6)
    return found[0] if found else None


def unknown_flag_error(argv: list[str], flag_values: flags.FlagValues) -> str | None:
    """The line for the first ``--flag`` of argv that neither the command nor absl defines
    (None when there is none), with the command's flag it most likely misspells.
    ``--config.<field>`` overrides are left to :func:`override_error`; after ``--`` every
    argument is positional."""
    ours = [n for n in flag_values if "." not in n]
    configs = _config_flag_names(flag_values)
    takes_value = False
    for arg in argv[1:]:
        if arg == "--":
            break
        if takes_value or not arg.startswith("-") or arg == "-" or _is_number(arg):
            takes_value = False  # A flag's value given as the next argument, or a positional.
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        known = flag_values if name in flag_values else flags.FLAGS if name in flags.FLAGS else None
        if known is not None:
            takes_value = "=" not in arg and not known[name].boolean
            continue
        head, dot, field = name.partition(".")
        if dot and head in configs:
            continue  # A --config.<field> override: override_error names a wrong field.
        if any(name[2:] in fv and fv[name[2:]].boolean for fv in (flag_values, flags.FLAGS)):
            continue  # --noforce
        guess = near(head, configs) if dot else near(name, ours)
        hint = f"did you mean --{guess}{dot}{field}? " if guess else ""
        return f"unknown flag {arg.split('=', 1)[0]}; {hint}--help lists this command's flags."
    return None


def _is_number(text: str) -> bool:
    """Whether ``text`` is a number (``--config.phases[0].lr -1``: a value, never a flag)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


_OVERRIDE = re.compile(r"^--?(\w+)\.([^=]+)(?:=.*)?$")
_CONFIG_FLAGS: dict[int, tuple[Any, str, bool]] = {}  # id(FlagValues) -> config_flag's arguments.


def config_flag(flag_values: flags.FlagValues, help_string: str, default: Any = None,
                required: bool = True) -> None:
    """Define ``--config``: a config file (``configs/x.py[:arg]``), or with ``default`` (a
    ConfigDict) that config; ``--config.<field>=value`` overrides any field. ml_collections
    reads which overrides to define from the argv it is given, so parse_flags defines the flag
    again with each argv it parses (a command called twice in one process, as tests do)."""
    _CONFIG_FLAGS[id(flag_values)] = (default, help_string, required)
    _define_config(flag_values, default, help_string, required, sys.argv)


def _define_config(flag_values: flags.FlagValues, default: Any, help_string: str,
                   required: bool, argv: list[str]) -> None:
    for name in [n for n in flag_values if n == "config" or n.startswith("config.")]:
        delattr(flag_values, name)
    if default is None:
        config_flags.DEFINE_config_file("config", None, help_string, flag_values=flag_values,
                                        sys_argv=argv)
    else:
        config_flags.DEFINE_config_dict("config", default.copy_and_resolve_references(),
                                        help_string, flag_values=flag_values, sys_argv=argv)
    if required and default is None:
        flags.mark_flag_as_required("config", flag_values=flag_values)


def _config_flag_names(flag_values: flags.FlagValues) -> list[str]:
    """The flags defined with ml_collections' config_flags (their type names it)."""
    return [name for name, f in flag_values._flags().items() if f.flag_type() == "config object"]


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name=v`` or ``--name v`` in argv (the last one wins), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def missing_config_file(path: str) -> str | None:
    """The one-line error for a config path that is not a file (None when it is one)."""
    file = path.split(":", 1)[0]
    if os.path.isfile(file):
        return None
    msg = (f"config file {file!r} not found (looked for {os.path.abspath(file)}; relative paths "
           f"start at {os.getcwd()})")
    ours = os.path.join(_PROJECT_ROOT, file)
    if not os.path.isabs(file) and os.path.isfile(ours):
        return f"{msg}: did you mean --config={ours}{path[len(file):]}?"
    return f"{msg}; the project's configs are in {os.path.join(_PROJECT_ROOT, 'configs')}."


def _split_path(path: str) -> list[str | int]:
    """``phases[1].lr`` -> ["phases", 1, "lr"]."""
    return [int(index) if index else name
            for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path)]


def override_error(config: Any, path: str) -> str | None:
    """Why ``--config.<path>`` names no field of ``config`` (None when it does)."""
    node, done = config, ""
    for part in _split_path(path):
        if isinstance(part, int):
            if not isinstance(node, (list, tuple)) or part >= len(node):
                n = len(node) if isinstance(node, (list, tuple)) else 0
                return (f"--config.{path}: {done}[{part}] is out of range: {done} has {n} "
                        f"entries ({done}[0]..{done}[{n - 1}])" if n else
                        f"--config.{path}: {done} is not a list")
            node, done = node[part], f"{done}[{part}]"
            continue
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = f"{done}." if done else ""
            guess = near(part, [str(k) for k in keys])
            hint = f"; did you mean --config.{where}{guess}?" if guess else (
                f"; {done or 'the config'} has: {', '.join(map(str, keys))}" if keys else "")
            return f"--config.{path}: no field {part!r} in {done or 'the config'}{hint}"
        node, done = node[part], f"{done}.{part}" if done else part
    return None


def describe_flag_error(error: BaseException, argv: list[str],
                        flag_values: flags.FlagValues) -> str:
    """One line for a failure while parsing flags: config-file or override problems first."""
    default = _CONFIG_FLAGS.get(id(flag_values), (None,))[0]
    names = set(_config_flag_names(flag_values)) | ({"config"} if id(flag_values) in _CONFIG_FLAGS
                                                     else set())
    for name in names:
        path, config = _flag_value(argv, name), default
        if path is not None:
            missing = missing_config_file(path)
            if missing:
                return missing
            try:  # Imported here: cli must load before JAX (a Ctrl-C during imports).
                from cifar_flax.config import load_config_file

                config = load_config_file(path)
            except Exception as e:  # noqa: BLE001 - the config file itself raised.
                return f"config file {path!r} failed to load: {type(e).__name__}: {_last_line(e)}"
        for arg in argv[1:]:
            m = _OVERRIDE.match(arg)
            if m and m.group(1) == name and config is not None:
                problem = override_error(config, m.group(2))
                if problem:
                    return problem
    return _last_line(error)


def _last_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """``config`` with the ``--config.<path>=value`` values of a config_dict flag
    (config_flags.get_override_values) set into it; a path it lacks is a UserError."""
    for path, value in overrides.items():
        problem = override_error(config, path)
        if problem:
            raise UserError(problem)
        *parents, last = _split_path(path)
        node = config
        for part in parents:
            node = node[part]
        node[last] = value
    return config
