"""Which exceptions mean bad input, not a bug: the command line prints their message as one line
and exits with status 2 (``cluster.cli.main``)."""

from chimera.chat import ConversationError
from chimera.checkpoint import CheckpointError
from chimera.tokenizer import TokenizerError
from cluster.app.promote import PromoteError
from cluster.app.rundir import RunDirError
from results.db import RunDatabaseError
from trainers.checkpoints import CheckpointStateError
from trainers.corpus import CorpusError
from trainers.preferences import PreferenceDataError
from trainers.sft import ChatDataError
from trainers.store import StoreError


class CommandError(Exception):
    """A user error with a message fit to print as is."""


def user_errors() -> tuple[type[Exception], ...]:
    """The library's errors that mean bad input (a file, a flag, a URL), not a bug."""
    return (CommandError, RunDirError, PromoteError, RunDatabaseError, CorpusError, StoreError,
            TokenizerError, CheckpointError, CheckpointStateError, ChatDataError,
            ConversationError, PreferenceDataError)


def settings_errors() -> tuple[type[Exception], ...]:
    """``user_errors`` and what a command's settings raise when its options do not fit
    together (the dataclasses validate themselves with ValueError), or name a missing file."""
    return (*user_errors(), ValueError, FileNotFoundError)
