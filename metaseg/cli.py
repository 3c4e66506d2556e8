"""What every entry point shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import contextlib
import logging
import sys

from metaseg.utils.errors import MetasegError


@contextlib.contextmanager
def user_errors(prog: str):
    """Print a ``MetasegError`` as ``PROG: error: ...`` and exit 2.

    The message also goes to the log when logging is configured (Hydra's ``<run dir>/*.log``), so
    a run's log says why it stopped; without a handler (``metaseg-report``) it is not logged, or
    Python's last-resort handler would print it a second time.
    """
    try:
        yield
    except MetasegError as exc:
        logger = logging.getLogger("metaseg")
        if logger.hasHandlers():
            logger.error("%s", exc)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
