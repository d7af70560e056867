"""``chimera promote``: the search's winner becomes a chat model.

    settings.py   PromoteSettings, PromoteError, the winner of a run
    preflight.py  what is checked before any work; the evaluation's prompts
    records.py    the stage records (promote-state.json)
    stages.py     refinement, pretraining, fine-tuning (shared with chimera train / sft)
    instruction_data.py  the fine-tuning conversations and held-out questions for the run's
                  corpus (the story generator's, or made from its own documents)
    dpo_stage.py  with --dpo: preference tuning after fine-tuning, and its evaluation
    budget.py     --budget: the stages sized to a wall clock on this machine
    finalists.py  under --budget: pretraining shared by a size ladder of the run's candidates,
                  the best as measured the base model
    pipeline.py   promote(): the stages in order, each skipped when done
    report.py     samples, report.md, metrics.json, loss_curves.png


    refine (Optuna on Ray) -> pretrain (packed, checkpointed; Ray Train with several workers;
        under --budget, of up to --finalists candidates, the best kept)
        -> chat fine-tune (assistant-only loss) -> [--dpo: preference-tune (TRL's DPO)]
        -> evaluate -> model directory

The model directory::

    model.safetensors, config.json   the chat model (``chimera generate`` / ``chat`` load it),
                                     saved as soon as fine-tuning ends
    tokenizer/                       with the chat template
    base/                            the pretrained model before fine-tuning
    finalists/candidate-N/           under --budget, the other finalists' pretrained models
    sft-data/train.jsonl, val.jsonl  the conversations it was fine-tuned on
    checkpoints/pretrain, /sft       full training state (resume; removed when done)
    promote-state.json               the stage records (below)
    report.md, metrics.json, loss_curves.png

With ``--dpo`` the chat model at the top level (model.safetensors, config.json; the tokenizer is
the same) is the SFT+DPO one, and the fine-tuned model moves to sft/ first::

    sft/                             the SFT model (model.safetensors, config.json, tokenizer/)
    dpo-data/train.jsonl             the preference pairs it was tuned on (TRL's format;
                                     "own_mistake": rejected is the SFT model's answer)
    checkpoints/dpo                  TRL's checkpoints (resume; removed when done)

DPO tunes against a frozen copy of the SFT model on pairs of the right and a wrong answer to
reading questions about the run's training documents (or the generator's stories); the
evaluation adds the SFT model's question answering and bits per byte, and the held-out
preference accuracy (the share of held-out pairs, ``--qa-questions`` of them, whose chosen
reply the model finds likelier) of the base, SFT and SFT+DPO models: metrics.json's "dpo" and
"preference_accuracy", report.md's DPO table. ``--budget`` does not size DPO: it runs its
``--dpo-steps`` on top of the budget (TRL's loop has no clock here, and its speed is not
pretraining's). Without ``--dpo`` nothing of this exists and the stage has no record.

Before any work a preflight checks what would otherwise fail hours later: the settings fit
together (``--sft-seq-len`` within ``--max-seq-len``, the run's training windows too), every prompt
the evaluation uses encodes and leaves room for its reply in the context, at least one
fine-tuning conversation and one held-out question fit, the output directory is writable, and
the stage records agree with this command. Each fails as a ``PromoteError`` naming the flag to
change. Prompts that do not fit (a character-level tokenizer spends a token per character) are
skipped or trimmed, with a note in report.md, rather than failing the evaluation.

Stage records: ``promote-state.json`` (written atomically after every change) holds, per stage
(refine, pretrain, sft, dpo, evaluate), the settings it was started with and, once it is done,
its results: the refinement's best hyperparameters and trial counts, pretraining's history (the
model is in base/), fine-tuning's history (the chat model is in the directory itself, or in sft/
once DPO moved it: its "model" says where), DPO's steps, pairs, settings and TRL's logs, and
which attempt finished it. Run the same command again after a crash, a kill or Ctrl+C and the stages
recorded as done are skipped; the one that was running continues where it stopped (the Optuna
study from the run's database, training from its newest readable checkpoint). A command whose
settings differ from those a stage was started with is refused, naming the flag, rather than
mixing two runs in one directory (a --dpo promote rerun without --dpo too); only the
evaluation, which keeps no partial state, is simply redone when its settings (``--qa-questions``,
or ``--dpo`` added to a finished promote) change. DPO's stage writes sft/ and records it before
it trains, and replaces the top level only once trained, so a kill at any moment leaves the SFT
model readable where its record says. A promote that fails before writing
anything removes the output directory it created (and only that).
"""

from cluster.app.promote.pipeline import promote
from cluster.app.promote.records import StageRecords
from cluster.app.promote.settings import BASE_DIR, STATE_FILE, PromoteError, PromoteSettings, winner
from cluster.app.promote.stages import StepProgress, run_pretrain, run_sft, story_sampler

__all__ = ["BASE_DIR", "STATE_FILE", "PromoteError", "PromoteSettings", "StageRecords",
           "StepProgress", "promote", "run_pretrain", "run_sft", "story_sampler", "winner"]
