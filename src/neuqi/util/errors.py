"""Errors the user can fix: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


class UserError(Exception):
    """Bad input or usage: the message names the file or option and what to do."""


#: errno values that mean "the disk (or the user's quota) is full".
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_is_user_error(where: str) -> Iterator[None]:
    """Turn a full disk (``OSError`` ENOSPC/EDQUOT) raised in the block into a one-line UserError.

    ``where`` names what the block writes (e.g. ``"job store J or --out O"``), used when the
    error carries no file name. Finished work is kept by the job store, so the advice is to free
    space and run the same command again.
    """
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        target = e.filename or where
        raise UserError(
            f"{target}: no space left on device ({e.strerror or e}): free space and run the same "
            "command again; finished steps are kept"
        ) from None
