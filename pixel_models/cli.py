"""What train.py, sample.py (and evaluate.py) share as command-line programs.

- :func:`user_errors`: a user error (a bad setting, a missing or corrupt file) ends the program with one
  line on stderr, ``error: <message>``, and exit code 2 -- no traceback, unless ``HYDRA_FULL_ERROR=1``.
- :func:`check_overrides`: the same for an unknown key or option on the command line, or an override
  Hydra cannot parse, found by composing the config before ``@hydra.main`` does.
(The ``${run_id:}`` resolver of the run directories is registered in ``pixel_models/__init__.py``.)
"""

import contextlib
import difflib
import os
import re
import sys
import tempfile
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pixel_models.training.checkpoint import CheckpointError
from pixel_models.training.faults import NonFiniteError

USER_ERROR_EXIT = 2
# Raised by our own checks (and Lightning's / OmegaConf's for a bad setting), each with a message that
# names the key or file and the fix.
USER_ERRORS = (
    ValueError,
    TypeError,
    OSError,
    CheckpointError,
    NonFiniteError,
    MisconfigurationException,
    OmegaConfBaseException,
)


def one_line(err: BaseException) -> str:
    if isinstance(err, OmegaConfBaseException):
        # OmegaConf's messages run over several lines (full_key, object_type): the first and the key.
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        key = getattr(err, "full_key", None)
        return f"{first} (config key: {key})" if key and str(key) not in first else first
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


@contextlib.contextmanager
def user_errors():
    """``with user_errors(): main(cfg)``: a user error becomes ``error: <message>`` and exit code 2."""
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None


def check_overrides(script: str, config_name: str) -> None:
    """Before ``@hydra.main`` runs ``script``: an unknown key or option among the command line's overrides,
    or one Hydra cannot parse, ends the program with one line (``error: ...``, exit code 2) naming the
    override and what it could have meant. Plain ``key=value`` command lines only: with a Hydra flag
    (``-m``, ``--cfg``, ...) or ``HYDRA_FULL_ERROR=1``, Hydra reports its own errors, as it does for
    anything else that stops it composing the config."""
    args = sys.argv[1:]
    if not args or any(arg.startswith("-") for arg in args) or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    message = override_error(Path(script).resolve().parent / "conf", config_name, args)
    if message is not None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT)


def override_error(conf_dir: Path, config_name: str, overrides: list[str]) -> str | None:
    """Why Hydra would refuse to compose ``config_name`` from ``conf_dir`` with ``overrides``, in one line,
    or None if it composes (or fails for another reason, left to Hydra)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    def composed(with_overrides):
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name=config_name, overrides=with_overrides, return_hydra_config=True)

    try:
        cfg = composed(overrides)
    except MissingConfigException as err:
        group, _, option = (err.missing_cfg_file or "").rpartition("/")
        if not group or not err.options:
            return one_line(err)
        options = sorted(err.options)
        return f"{group}={option}: no such option in conf/{group}/; choose one of {', '.join(options)}" + (
            _did_you_mean(option, options)
        )
    except OverrideParseException as err:
        return f"cannot read the override: {one_line(err)}"
    except ConfigCompositionException as err:
        unknown = re.match(r"Could not override '([^']+)'", str(err))
        if unknown is None:  # not an unknown key: Hydra's message
            return None
        key = unknown.group(1)
        override = next((o for o in overrides if o.split("=", 1)[0] == key), key)
        parent, _, name = key.rpartition(".")
        try:
            node = composed([o for o in overrides if o != override])
            for part in parent.split(".") if parent else []:
                node = node[part]
            known = [str(k) for k in node.keys()]
        except Exception:  # the rest does not compose either, or the parent is not a mapping
            known = []
        where = f"under '{parent}'" if parent else "at the top level"
        if not known:
            hint = ""
        elif len(known) <= 30:
            hint = f"; the settings there: {', '.join(sorted(known))}"
        else:
            hint = "; add --cfg job to the command to list every setting"
        return f"{override}: no setting '{name}' {where}" + (
            _did_you_mean(name, known, prefix=f"{parent}." if parent else "") or hint
        )
    except Exception:  # anything else: @hydra.main reports it as usual
        return None
    return run_dir_error(OmegaConf.to_container(cfg.hydra.run, resolve=False).get("dir"))


def run_dir_error(run_dir) -> str | None:
    """Why the run directory ``hydra.run.dir`` (unresolved) could not be made, or None. Hydra makes it
    before the script's own checks run, and fails with a traceback; the part before the first
    interpolation is checked here: its nearest existing folder must take a new file."""
    if not isinstance(run_dir, str):
        return None
    reason = unwritable_folder(Path(run_dir.split("${", 1)[0] or "."))
    return reason and f"hydra.run.dir={run_dir}: {reason}; pass hydra.run.dir=<a folder you can write to>"


def unwritable_folder(folder: Path) -> str | None:
    """Why no file could be made in ``folder`` (made later with its parents where missing), or None:
    its nearest existing ancestor must be a folder that takes a new file. A temporary file is made and
    removed to find out, because access() says yes to root everywhere, also where no file can be made
    (/proc, some mounts)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"cannot write in folder {existing} ({err.strerror})"
    return None


def _did_you_mean(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""
