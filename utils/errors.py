"""The one exception type for mistakes a user can make (bad path, unknown task, corrupt file, ...).

Entry points catch :class:`UserError`, print its message as one line and exit with status 2
(see :func:`exit_on_user_error`); library callers get an ordinary exception they can handle.
"""
import functools
import os
import sys

USER_ERROR_EXIT_CODE = 2


class UserError(ValueError):
    """A problem with the user's input: the message names the input and what was expected."""


def one_line(message):
    """The user-facing line of an error message.

    A UserError raised in a DataLoader worker reaches the main process re-raised with the worker's whole
    traceback as its message; the original message follows the traceback's last "UserError: ".
    """
    if "Original Traceback" in message:
        message = message.rsplit(f"{UserError.__name__}: ", 1)[-1]
    return " ".join(message.split())


def exit_on_user_error(main):
    """Decorate a command-line ``main`` so that a :class:`UserError` ends it with one line and status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            rank = os.environ.get("RANK", "0")  # under torchrun every rank may meet the same problem
            prefix = "" if rank == "0" else f"[rank {rank}] "
            print(f"{prefix}error: {one_line(str(err))}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper
