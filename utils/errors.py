"""The one exception type for mistakes a user can make (bad path, unknown task, corrupt file, ...).

Entry points catch :class:`UserError`, print its message as one line and exit with status 2
(see :func:`exit_on_user_error`); library callers get an ordinary exception they can handle.
"""
import functools
import sys

USER_ERROR_EXIT_CODE = 2


class UserError(ValueError):
    """A problem with the user's input: the message names the input and what was expected."""


def exit_on_user_error(main):
    """Decorate a command-line ``main`` so that a :class:`UserError` ends it with one line and status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper
