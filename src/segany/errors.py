"""User-facing errors.

Anything a user can cause (a bad file, a bad prompt, an unknown model) raises :class:`SegAnyError`
with a message that names what is wrong; the CLI prints that message on one line and exits 2.
"""


class SegAnyError(ValueError):
    """An error caused by user input, with a message meant for the user."""
