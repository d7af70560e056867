"""The command line's user-error types, in their own module so every subcommand module (and
``python -m cluster.cli``, which loads cli.py a second time as ``__main__``) shares one class."""


class CommandError(Exception):
    """A user error with a message fit to print as is."""


def user_errors() -> tuple[type[Exception], ...]:
    """The library's errors that mean bad input (a file, a flag, a URL), not a bug: the command
    line prints their message as one line and exits with status 2. Imported when called, so the
    CLI starts without loading torch."""
    from chimera.chat import ConversationError
    from chimera.checkpoint import CheckpointError
    from chimera.tokenizer import TokenizerError
    from cluster.evolve import RunDirError
    from results.db import RunDatabaseError
    from trainers.checkpoints import CheckpointStateError
    from trainers.corpus import CorpusError
    from trainers.sft import ChatDataError
    from trainers.store import StoreError

    return (CommandError, RunDirError, RunDatabaseError, CorpusError, StoreError, TokenizerError,
            CheckpointError, CheckpointStateError, ChatDataError, ConversationError)
