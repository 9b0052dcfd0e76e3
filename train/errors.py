"""Input errors: a data file, a line of it, a column or a model that is wrong, said in one line with the fix.

The command lines print such an error as one line and exit with status 2, like a config error (the traceback only
with `--debug`); anything else is a bug and keeps its traceback. The classes also derive from the built-in error a
caller would expect (FileNotFoundError, KeyError), so code that catches those keeps working.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path
from typing import Iterator, Optional

EXIT_INPUT_ERROR = 2  # the same status as a config error


class InputError(ValueError):
    """Bad input the user must fix; the message is one line naming the key, file (and line) or model, and the fix."""

    def __str__(self) -> str:  # KeyError would quote it
        return str(self.args[0]) if self.args else ""


class InputNotFoundError(InputError, FileNotFoundError):
    """A file, folder, split or model that does not exist where the config says."""


class InputKeyError(InputError, KeyError):
    """A column or split the data does not have."""


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def model_error(name: str, err: BaseException, key: Optional[str] = None, revision: Optional[str] = None) -> InputError:
    """One line for a model (or tokenizer) that transformers could not load: a wrong path, a folder without the
    files, a hub name that is not cached while the hub is out of reach, or one the hub does not have."""
    error = _model_error(name, err, key, revision)
    error.model, error.key, error.original = name, key, err  # so that a caller that knows the key can add it
    return error


def _model_error(name: str, err: BaseException, key: Optional[str], revision: Optional[str]) -> InputError:
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    what = f"{key}: {name!r}" if key else f"model {name!r}"
    cause = err.__cause__ or err.__context__
    causes = (err, cause)
    path = Path(name).expanduser()
    if path.is_dir():
        return InputError(f"{what}: the folder cannot be loaded ({first_line(err)}); point "
                          f"{key or 'it'} at a folder written by save_pretrained")
    if looks_like_path(name) or any(isinstance(c, HFValidationError) for c in causes):
        return InputNotFoundError(f"{what} is not a folder here and not a hub model name; fix the path, or give "
                                  f"a hub name like google/flan-t5-base")
    if any(isinstance(c, LocalEntryNotFoundError) for c in causes) or "couldn't connect" in str(err).lower():
        from huggingface_hub import constants

        rev = f" --revision {revision}" if revision else ""
        return InputNotFoundError(
            f"{what} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached "
            f"(offline or HF_HUB_OFFLINE=1). On a machine with network run `hf download {name}{rev}` (older clients: "
            f"`huggingface-cli download {name}{rev}`) and copy that cache here (or set HF_HOME to it), or set "
            f"{key or 'the model'} to a local folder that holds the model")
    if any(isinstance(c, RepositoryNotFoundError) for c in causes):
        return InputNotFoundError(f"{what} is not a model on the hub (or it is private or gated: log in with "
                                  f"`hf auth login`); check the name, or use a local folder")
    return InputError(f"{what}: cannot be loaded: {first_line(err)}")


@contextlib.contextmanager
def loading_model(name: str, key: Optional[str] = None, revision: Optional[str] = None) -> Iterator[None]:
    """Turn the OSError of a failed `from_pretrained(name)` into an InputError saying what to do. Nested inside
    another `loading_model` that knows the config key, the outer one names the key."""
    try:
        yield
    except InputError as err:
        if key and getattr(err, "original", None) is not None and err.key is None:
            raise model_error(name, err.original, key, revision) from err.original
        raise
    except OSError as err:  # transformers reports missing files and hub failures as OSError
        raise model_error(name, err, key, revision) from err


def report(prog: str, err: BaseException, debug: bool) -> int:
    """Print a config or input error as one line (after the traceback with --debug); return the exit status."""
    from detoxrl.train.config import ConfigError

    if debug:
        traceback.print_exception(err)
    kind = getattr(err, "label", None) or ("config error" if isinstance(err, ConfigError) else "input error")
    print(f"{prog}: {kind}: {err}", file=sys.stderr)
    return EXIT_INPUT_ERROR
