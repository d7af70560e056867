"""``chimera promote``: the search's winner becomes a chat model.

    settings.py   PromoteSettings, PromoteError, the winner of a run
    preflight.py  what is checked before any work; the evaluation's prompts
    records.py    the stage records (promote-state.json)
    stages.py     refinement, pretraining, fine-tuning (shared with chimera train / sft)
    instruction_data.py  the fine-tuning conversations and held-out questions for the run's
                  corpus (the story generator's, or made from its own documents)
    pipeline.py   promote(): the stages in order, each skipped when done
    report.py     samples, report.md, metrics.json, loss_curves.png


    refine (Optuna on Ray) -> pretrain (packed, checkpointed; Ray Train with several workers)
        -> chat fine-tune (assistant-only loss) -> evaluate -> model directory

The model directory::

    model.safetensors, config.json   the chat model (``chimera generate`` / ``chat`` load it),
                                     saved as soon as fine-tuning ends
    tokenizer/                       with the chat template
    base/                            the pretrained model before fine-tuning
    sft-data/train.jsonl, val.jsonl  the conversations it was fine-tuned on
    checkpoints/pretrain, /sft       full training state (resume; removed when done)
    promote-state.json               the stage records (below)
    report.md, metrics.json, loss_curves.png

Before any work a preflight checks what would otherwise fail hours later: the settings fit
together (``--sft-seq-len`` within ``--max-seq-len``, the run's training windows too), every prompt
the evaluation uses encodes and leaves room for its reply in the context, at least one
fine-tuning conversation and one held-out question fit, the output directory is writable, and
the stage records agree with this command. Each fails as a ``PromoteError`` naming the flag to
change. Prompts that do not fit (a character-level tokenizer spends a token per character) are
skipped or trimmed, with a note in report.md, rather than failing the evaluation.

Stage records: ``promote-state.json`` (written atomically after every change) holds, per stage
(refine, pretrain, sft, evaluate), the settings it was started with and, once it is done, its
results: the refinement's best hyperparameters and trial counts, pretraining's history (the model
is in base/), fine-tuning's history (the chat model is in the directory itself), and which
attempt finished it. Run the same command again after a crash, a kill or Ctrl+C and the stages
recorded as done are skipped; the one that was running continues where it stopped (the Optuna
study from the run's database, training from its newest readable checkpoint). A command whose
settings differ from those a stage was started with is refused, naming the flag, rather than
mixing two runs in one directory; only the evaluation, which keeps no partial state, is simply
redone when its settings (``--qa-questions``) change. A promote that fails before writing
anything removes the output directory it created (and only that).
"""

from cluster.app.promote.pipeline import promote
from cluster.app.promote.records import StageRecords
from cluster.app.promote.settings import BASE_DIR, STATE_FILE, PromoteError, PromoteSettings, winner
from cluster.app.promote.stages import StepProgress, run_pretrain, run_sft, story_sampler

__all__ = ["BASE_DIR", "STATE_FILE", "PromoteError", "PromoteSettings", "StageRecords",
           "StepProgress", "promote", "run_pretrain", "run_sft", "story_sampler", "winner"]
