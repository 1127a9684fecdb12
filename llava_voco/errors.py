"""The entries' error policy: a user's mistake is one line on stderr, a bug keeps its traceback.

The chat CLI, the eval entry, the scripts and the server raise :class:`InputError` (or one of the other
``USER_ERRORS``) for what the user gave them; ``one_line_errors`` turns those into one line and exit status 1.
"""

from __future__ import annotations

import contextlib
import sys

from .conversation import ConversationError, UnknownTemplateError
from .image_io import ImageReadError
from .video import VideoError


class InputError(ValueError):
    """A user's mistake in what an entry was given (a missing model folder, a bad line in a question or
    answers file); the message names the file and the problem in one line."""


# What the entries report as one line: the user's mistakes, never bugs (those keep their traceback).
USER_ERRORS = (InputError, ImageReadError, VideoError, UnknownTemplateError, ConversationError)


@contextlib.contextmanager
def one_line_errors():
    """Around an entry's work: a user's mistake (``USER_ERRORS``) ends the process with one line on stderr
    and exit status 1, where a traceback would bury the file name under frames the user cannot act on."""
    try:
        yield
    except USER_ERRORS as error:
        print("error: " + " ".join(str(error).split("\n")), file=sys.stderr, flush=True)
        raise SystemExit(1) from None


__all__ = ["InputError", "USER_ERRORS", "one_line_errors"]
