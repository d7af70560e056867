"""The checks made before any work: what would otherwise fail hours later fails now, naming the
flag to change, and the evaluation's prompts are chosen so that every one fits the context."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chimera.chat import ConversationError, prompt_ids
from chimera.inference import TOKENIZER_DIR
from chimera.tokenizer import CHAT_TEMPLATE, CHAT_TOKENS
from cluster.app.promote.dpo_stage import check_preferences
from cluster.app.promote.instruction_data import (
    from_stories,
    question_source,
    run_store,
    sft_conversations,
    validation_conversations,
)
from cluster.app.promote.records import StageRecords, stage_settings
from cluster.app.promote.settings import (
    BASE_DIR,
    QA_DRAW_FACTOR,
    SAMPLE_NEW_TOKENS,
    SAMPLE_QUESTIONS,
    SFT_SCAN,
    STORY_PROMPT,
    PromoteError,
    PromoteSettings,
)
from search.genome import Genome
from trainers.instructions import qa_items
from trainers.sft import (
    QA_NEW_TOKENS,
    ChatDataError,
    encode_conversation,
)


# ----------------------------------------------------------------------------- preflight
@dataclass
class EvaluationPlan:
    """The prompts the evaluation will use, chosen (and checked) before any work."""

    story_prompt: list[int]  # token ids of STORY_PROMPT (its tail, if trimmed)
    story_text: str  # what those ids stand for, as report.md shows it
    questions: list[str]  # the SAMPLE_QUESTIONS whose prompt fits
    qa_items: list[dict]  # the held-out questions scored (none: the documents give none)
    sample_item: dict | None  # the held-out question shown in report.md
    sample_tokens: int  # new tokens per sample
    sample_item_tokens: int  # new tokens for the held-out question's reply
    notes: list[str] = field(default_factory=list)  # what was skipped or trimmed, and why
    # With --dpo: the held-out preference pairs scored (dpo_stage.check_preferences).
    preference_pairs: list[dict] = field(default_factory=list)


def _probe_tokenizer(tokenizer):
    """A copy of the tokenizer with the chat tokens and template fine-tuning will give it, so
    the preflight encodes prompts exactly as the evaluation will, without touching the one
    pretraining saves in base/."""
    probe = copy.deepcopy(tokenizer)
    missing = [t for t in CHAT_TOKENS if t not in probe.get_vocab()]
    if missing:
        probe.add_tokens(missing, special_tokens=True)
    if not getattr(probe, "chat_template", None) or missing:
        probe.chat_template = CHAT_TEMPLATE
    return probe


def _encode(tokenizer, text: str, what: str) -> list[int]:
    try:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception as err:  # noqa: BLE001 - a tokenizer's own failure, whatever its type
        raise PromoteError(f"the run's tokenizer cannot encode {what} ({type(err).__name__}: "
                           f"{err})") from None


def _unknown_characters(tokenizer, texts: list[str]) -> list[str]:
    """Characters that a tokenizer with an unknown token (character-level) turns into it."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    chars = sorted({c for text in texts for c in text})
    return [c for c in chars if _encode(tokenizer, c, repr(c)) == [unk]]


def _prompt_fits(tokenizer, messages: list[dict], room: int) -> int | None:
    """Tokens of the prompt (the assistant's turn opened) when it fits ``room``, else None."""
    try:
        ids, dropped = prompt_ids(tokenizer, messages, room)
    except ConversationError:
        return None
    return len(ids) if not dropped else None


def _first_fitting(tokenizer, items: list[dict], want: int, room: int
                   ) -> tuple[list[dict], int, int]:
    """The first ``want`` items whose prompt fits ``room`` tokens, how many items were looked
    at, and the shortest prompt seen (for a message saying what would fit)."""
    kept, shortest, seen = [], None, 0
    for seen, item in enumerate(items, 1):
        length = len(prompt_ids(tokenizer, item["messages"], 1 << 30)[0])
        shortest = length if shortest is None else min(shortest, length)
        if length <= room:
            kept.append(item)
            if len(kept) == want:
                break
    return kept, seen, shortest


def plan_evaluation(settings: PromoteSettings, tokenizer,
                    draw_questions: Callable[[int, int], list[dict]] = qa_items
                    ) -> EvaluationPlan:
    """Choose the evaluation's prompts so that each leaves room for its reply in the context;
    raise PromoteError when the evaluation could not work at all. ``draw_questions(n, seed)``
    gives held-out questions (see ``instruction_data.question_source``)."""
    context = settings.max_seq_len
    if context < QA_NEW_TOKENS + 8:  # chat.reply_stream needs 8 tokens of prompt room
        raise PromoteError(f"--max-seq-len {context} leaves no room for a question and its "
                           f"{QA_NEW_TOKENS}-token answer; use at least {QA_NEW_TOKENS + 8}")
    notes = []
    # Samples shrink with a small context rather than crowd the prompt out.
    sample_tokens = min(SAMPLE_NEW_TOKENS, context // 4)
    story = _encode(tokenizer, STORY_PROMPT, f"the story prompt {STORY_PROMPT!r}")
    story_text = STORY_PROMPT
    if len(story) + sample_tokens > context:
        story = story[-(context - sample_tokens):]
        story_text = tokenizer.decode(story, skip_special_tokens=True)
        notes.append(f"the story prompt was trimmed to its last {len(story)} tokens to leave "
                     f"{sample_tokens} for the story in --max-seq-len {context}")
    room = context - sample_tokens
    questions = []
    for question in SAMPLE_QUESTIONS:
        if _prompt_fits(tokenizer, [{"role": "user", "content": question}], room) is None:
            notes.append(f"sample question {question!r} skipped: it does not fit --max-seq-len "
                         f"{context} with {sample_tokens} tokens for the reply")
        else:
            questions.append(question)

    wanted = settings.qa_questions
    drawn = draw_questions(min(wanted * QA_DRAW_FACTOR, wanted + 400), settings.seed)
    if not drawn:
        # A corpus with nothing to ask about (tables, code, a synthetic text) still gets its
        # model, its chat model and the held-out bits per byte; only the accuracy is missing.
        notes.append("question answering not measured: the run's held-out documents give no "
                     "question (no speaker, name, place or pair of sentences found in them)")
        return _plan(tokenizer, story, story_text, questions, [], None, sample_tokens,
                     sample_tokens, notes)
    items, considered, shortest = _first_fitting(tokenizer, drawn, wanted,
                                                 context - QA_NEW_TOKENS)
    if not items:
        raise PromoteError(
            f"no held-out question fits --max-seq-len {context} with {QA_NEW_TOKENS} tokens "
            f"for the answer (the shortest of {len(drawn)} needs {shortest} tokens of prompt "
            f"with this tokenizer); use --max-seq-len {shortest + QA_NEW_TOKENS} or more")
    if considered > len(items):
        notes.append(f"{considered - len(items)} of the first {considered} held-out questions "
                     f"were too long for --max-seq-len {context} and were skipped, so the "
                     f"{len(items)} scored have shorter stories"
                     + (f" (only {len(items)} of {wanted} asked for fit)"
                        if len(items) < wanted else ""))
    sample, _, _ = _first_fitting(tokenizer, draw_questions(QA_DRAW_FACTOR, settings.seed + 1),
                                  1, room)
    sample_item_tokens = sample_tokens
    if not sample:
        # Its answer is a short fact: the scored questions' reply length will do.
        sample, sample_item_tokens = items[:1], QA_NEW_TOKENS
        notes.append(f"no sample held-out question fits --max-seq-len {context} with "
                     f"{sample_tokens} tokens for the reply: report.md shows a scored one, "
                     f"with {QA_NEW_TOKENS}")

    return _plan(tokenizer, story, story_text, questions, items, sample[0], sample_tokens,
                 sample_item_tokens, notes)


def _plan(tokenizer, story: list[int], story_text: str, questions: list[str],
          items: list[dict], sample_item: dict | None, sample_tokens: int,
          sample_item_tokens: int, notes: list[str]) -> EvaluationPlan:
    """The plan, with a note on the characters its prompts need that the tokenizer lacks."""
    texts = [STORY_PROMPT, *SAMPLE_QUESTIONS, *(m["content"] for i in items
                                                for m in i["messages"])]
    template = tokenizer.apply_chat_template([{"role": "user", "content": ""}],
                                             tokenize=False, add_generation_prompt=True)
    for special in tokenizer.all_special_tokens:  # a token of its own, not characters
        template = template.replace(special, "")
    unknown = _unknown_characters(tokenizer, [*texts, template])
    if unknown:
        notes.append(f"the tokenizer lacks {', '.join(repr(c) for c in unknown)} (used by the "
                     f"prompts or the chat template): they become {tokenizer.unk_token}")
    return EvaluationPlan(story, story_text, questions, items, sample_item, sample_tokens,
                          sample_item_tokens, notes)


def _check_sft_data(settings: PromoteSettings, tokenizer,
                    draw: Callable[[int, bool], list[dict]]) -> None:
    """At least one training and one validation conversation must fit --sft-seq-len (+1
    tokens: the inputs and the shifted targets), with assistant tokens to learn from. Only the
    first ``SFT_SCAN`` (``draw(n, heldout)`` makes them) are looked at: a tenth of them are
    greetings, the shortest kind, so when none of those fit, fine-tuning would have next to
    nothing to learn from anyway."""
    width = settings.sft_hparams.seq_len + 1
    for heldout, n in ((False, settings.sft_conversations),
                       (True, validation_conversations(settings))):
        shortest, n = None, min(n, SFT_SCAN)
        for record in draw(n, heldout):
            try:
                ids, mask = encode_conversation(tokenizer, record["messages"])
            except (ChatDataError, ConversationError) as err:
                raise PromoteError(f"the chat template cannot render the fine-tuning data with "
                                   f"the run's tokenizer: {err}") from None
            if len(ids) <= width and any(mask):
                break
            shortest = len(ids) if shortest is None else min(shortest, len(ids))
        else:
            kind = "validation" if heldout else "training"
            raise PromoteError(
                f"none of the first {n} {kind} conversations fits --sft-seq-len "
                f"{settings.sft_hparams.seq_len} (the shortest needs {shortest} tokens with "
                f"this tokenizer); raise --sft-seq-len to {shortest - 1} or more (and "
                f"--max-seq-len with it)")


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PromoteError(f"{out}: exists and is not a directory; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PromoteError(f"{out}: cannot write the model directory there "
                           f"({err.strerror or err}); choose another --out") from None


def preflight(settings: PromoteSettings, run, tokenizer, records: StageRecords,
              candidate_id: int, genome: Genome) -> tuple[EvaluationPlan, list[str]]:
    """Everything that can be checked before the work starts (see the module docstring).
    Returns the evaluation's plan and the stages to redo because only their settings changed."""
    out = settings.out_dir
    sft_len = settings.sft_hparams.seq_len
    if sft_len > settings.max_seq_len:
        raise PromoteError(f"--sft-seq-len {sft_len} exceeds --max-seq-len "
                           f"{settings.max_seq_len}: a conversation must fit the chat model's "
                           f"context; lower --sft-seq-len or raise --max-seq-len")
    if run.hparams.seq_len > settings.max_seq_len:
        raise PromoteError(f"the run trained on windows of {run.hparams.seq_len} tokens "
                           f"(seq_len in {Path(settings.run_dir) / 'run.json'}); --max-seq-len "
                           f"{settings.max_seq_len} must be at least that")
    redo = records.check(candidate_id, genome, stage_settings(settings, candidate_id), out)
    _check_writable(out)  # creates it: any failure from here on removes it again if empty
    sft_model = (records.done("sft") or {}).get("model", ".")  # sft/ once DPO moved it
    for stage, needed in (("pretrain", out / BASE_DIR / "model.safetensors"),
                          ("sft", out / sft_model / "model.safetensors"),
                          ("sft", out / TOKENIZER_DIR), ("dpo", out / "model.safetensors")):
        if records.done(stage) is not None and not needed.exists():
            raise PromoteError(f"{records.path} records {stage} as done but {needed} is "
                               f"missing; restore it, or use another --out to start over")
    if not 0 <= settings.pretrain_mix < 1:
        raise PromoteError(f"--pretrain-mix {settings.pretrain_mix}: must be in [0, 1), so "
                           f"that every fine-tuning batch holds conversations")
    probe = _probe_tokenizer(tokenizer)
    store = None if from_stories(run) else run_store(settings)
    if records.done("sft") is None:
        _check_sft_data(settings, probe, lambda n, heldout: sft_conversations(
            settings, run, store, probe, n, heldout))
    plan = plan_evaluation(settings, probe, question_source(settings, run, store, probe))
    if settings.dpo:
        plan.preference_pairs = check_preferences(settings, probe, records)
    return plan, redo


# ----------------------------------------------------------------------------- progress
