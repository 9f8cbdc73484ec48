"""The one exception type for bad user input."""


class InputError(ValueError):
    """A user-supplied input (file, option, weights folder) is unusable; the message says what to do.

    Programming errors stay ordinary exceptions; this one is safe to show to an end user as is.
    """
