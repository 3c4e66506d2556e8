"""What every entry point shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import contextlib
import logging
import sys

from metaseg.utils.errors import MetasegError


@contextlib.contextmanager
def user_errors(prog: str):
    try:
        yield
    except MetasegError as exc:
        logging.getLogger("metaseg").error("%s", exc)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
