"""The command line's user-error type, in its own module so every subcommand module (and
``python -m cluster.cli``, which loads cli.py a second time as ``__main__``) shares one class."""


class CommandError(Exception):
    """A user error with a message fit to print as is."""
