"""The errors a user may see: one base, split by whose move it is to fix the problem."""


class LatentSyncError(Exception):
    """Base of every error whose message is meant for the user as is (no traceback needed)."""


class InputError(LatentSyncError, ValueError):
    """A user-supplied input (file, option, weights folder, output path) is unusable; the message says what to do.

    Programming errors stay ordinary exceptions; this one is safe to show to an end user as is (CLI exit status 2).
    """


class ResourceError(LatentSyncError, RuntimeError):
    """The machine, not the input: a full disk, no GPU, an unreachable download (CLI exit status 1)."""
