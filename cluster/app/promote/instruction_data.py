"""What the chat model is fine-tuned on and questioned with, for the corpus the run searched.

The built-in story corpus: the story generator's conversations and questions, whose answers are
the facts it drew (from stories seeded apart from the corpus's). Any other corpus: both are made
from the run's own documents (``trainers.doc_instructions``): the training conversations from
the store's training split only; the held-out questions, and the fine-tuning's validation
conversations, from its validation split, documents the model never trained on. Long documents
are cut into passages that leave room in the window for the question and the reply.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from cluster.app.promote.settings import PromoteSettings, run_settings
from cluster.app.rundir import STORE_DIR
from trainers.corpus import STORIES
from trainers.doc_instructions import StoreDocuments, document_conversations, document_qa_items
from trainers.instructions import conversations, qa_items
from trainers.preferences import PreferenceDataError, document_preferences, story_preferences
from trainers.recipe import TrainHparams, evaluate
from trainers.sft import QA_NEW_TOKENS
from trainers.store import TokenStore

PASSAGE_SHARE = 0.6  # of a window's tokens a passage may fill; the rest: prompt, question, reply


def from_stories(run) -> bool:
    """Whether the run searched on the built-in story corpus (``run``: its EvolveSettings)."""
    return run.corpus.source == STORIES


def source_of(run) -> str:
    return "generated stories" if from_stories(run) else "the run's own documents"


def run_store(settings: PromoteSettings) -> TokenStore:
    """The run's token store, opened without reading every page again (the promote that uses
    it has verified it)."""
    return TokenStore.open(Path(settings.run_dir) / STORE_DIR, verify=False)


def passage_chars(store: TokenStore, tokens: int) -> int:
    """The longest passage, in characters, that fills about ``PASSAGE_SHARE`` of ``tokens``."""
    return max(1, int(tokens * PASSAGE_SHARE * store.info("train").bytes_per_token))


def validation_conversations(settings: PromoteSettings) -> int:
    return max(64, settings.sft_conversations // 20)


def sft_conversations(settings: PromoteSettings, run, store: TokenStore, tokenizer, n: int,
                      heldout: bool = False) -> list[dict]:
    """The first ``n`` fine-tuning conversations (a larger ``n`` extends a smaller one);
    ``heldout``: the validation ones."""
    if from_stories(run):
        return conversations(n, settings.seed, heldout=heldout)
    documents = StoreDocuments(store, "val" if heldout else "train", tokenizer)
    return document_conversations(documents, n, settings.seed,
                                  passage_chars(store, settings.sft_hparams.seq_len))


def question_source(settings: PromoteSettings, run, store: TokenStore | None, tokenizer
                    ) -> Callable[[int, int], list[dict]]:
    """``draw(n, seed)``: up to ``n`` held-out questions (``trainers.chat_data.qa_item``).
    ``store`` may be None for the built-in stories."""
    if from_stories(run):
        return qa_items
    documents = StoreDocuments(store, "val", tokenizer)
    room = passage_chars(store, settings.max_seq_len - QA_NEW_TOKENS)
    return lambda n, seed: document_qa_items(documents, n, seed, room)


def heldout_bpb(model: torch.nn.Module, store: TokenStore, hparams: TrainHparams) -> float:
    """Bits per byte of the store's validation text: the windows pretraining validated on
    (``hparams``: pretraining's), the same for every model scored."""
    batches = store.validation_batches(hparams.batch_size, hparams.seq_len,
                                       hparams.eval_batches)
    loss = evaluate(model, batches, next(model.parameters()).device)
    return store.bits_per_byte(loss, "val")


def run_preferences(run_dir: str | None, n: int, seed: int = 0, heldout: bool = False,
                    context: int = 512, with_answers: bool = False) -> tuple[list[dict], str]:
    """``n`` preference pairs from a run's corpus (its training documents, or with ``heldout``
    its validation ones; the generator's stories for the built-in corpus or for no run), and
    where they came from. Passages leave room for the question and reply in ``context``.
    ``with_answers``: each record also holds its question's "expected" and "others"."""
    if run_dir is None or from_stories(run := run_settings(run_dir)):
        return story_preferences(n, seed, heldout, with_answers), "generated stories"
    store = TokenStore.open(Path(run_dir) / STORE_DIR, verify=False)
    documents = StoreDocuments(store, "val" if heldout else "train")
    records = document_preferences(documents, n, seed,
                                   passage_chars(store, context - QA_NEW_TOKENS),
                                   with_answers=with_answers)
    if not records:
        raise PreferenceDataError(f"{run_dir}: its {'validation' if heldout else 'training'} "
                              f"documents give no question to build preference pairs from "
                              f"(no speaker, name, place or object found)")
    return records, source_of(run)
