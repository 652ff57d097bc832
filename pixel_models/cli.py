"""What train.py, sample.py (and evaluate.py) share as command-line programs.

- :func:`user_errors`: a user error (a bad setting, a missing or corrupt file) ends the program with one
  line on stderr, ``error: <message>``, and exit code 2 -- no traceback, unless ``HYDRA_FULL_ERROR=1``.
  Hydra's own errors while composing the config (an unknown key or option) are reported by Hydra, also
  without a traceback, with exit code 1.
(The ``${run_id:}`` resolver of the run directories is registered in ``pixel_models/__init__.py``.)
"""

import contextlib
import os
import sys

from lightning.fabric.utilities.exceptions import MisconfigurationException
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
