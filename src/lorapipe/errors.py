"""The one exception type lorapipe shows users as a one-line message instead of a traceback."""


class LorapipeError(Exception):
    """A problem the user can fix: the message names the file or key, the problem and the fix."""
