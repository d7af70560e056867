"""Preference tuning (DPO and its relatives) through TRL's ``DPOTrainer`` on the transformers
class of ``chimera.hf``, and the preference accuracy that measures it.

The policy and the frozen reference both start as the given (chat) model. Records are TRL's
conversational preference format (``trainers.preferences``). TRL checkpoints every
``checkpoint_every`` steps under ``checkpoint_dir`` and a rerun resumes from the newest.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chimera.chat import ConversationError, reply
from chimera.checkpoint import atomic_write
from chimera.generation import SamplingConfig
from chimera.model import Chimera
from trainers.answers import answer_is_right
from trainers.sft import QA_NEW_TOKENS, encode_conversation

# Under a tuned model's directory (chimera dpo's OUT, chimera promote --dpo's OUT).
CHECKPOINTS = Path("checkpoints") / "dpo"  # TRL's, removed once the model is written
PAIRS_FILE = Path("dpo-data") / "train.jsonl"  # the pairs it trained on (training_pairs)
SECONDS_FILE = "chimera_seconds.json"  # in each TRL checkpoint: training time up to it
# TRL's losses that take (chosen, rejected) pairs with a reference model; "sft" adds the chosen
# reply's negative log-likelihood (RPO), which keeps its probability from sinking with the
# rejected one's.
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "apo_zero", "apo_down")


@dataclass(frozen=True)
class DpoSettings:
    steps: int = 200
    batch_size: int = 8
    # Far above TRL's 1e-6 (for billion-parameter models): a 1-10M-parameter chat model moves
    # little at that rate in a few hundred steps. 3e-4 without the SFT term cost 6-16 points
    # of held-out question answering (bench/preference.py, BENCHMARKS.md).
    learning_rate: float = 1e-4
    beta: float = 0.1
    loss_type: str = "sigmoid"
    # > 0: add the chosen reply's NLL with this weight (RPO). Plain DPO widens the margin by
    # pushing both replies down, and greedy answers and the held-out text degrade with it.
    sft_weight: float = 1.0
    # Rejected = the model's own wrong answer where it gives one (with_own_mistakes): with it,
    # preference accuracy rose above SFT's on both seeds measured; without it, it did not.
    own_mistakes: bool = True
    max_length: int = 512
    warmup_steps: int = 10
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: one of {', '.join(LOSS_TYPES)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate={self.learning_rate}: must be a positive number")
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta}: must be positive")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight={self.sft_weight}: must be >= 0")


def loss_label(loss_type: str, sft_weight: float) -> str:
    """How reports and the console name a loss: "sigmoid", "sigmoid + 1.0 x SFT (RPO)"."""
    return loss_type + (f" + {sft_weight} x SFT (RPO)" if sft_weight else "")


@dataclass
class DpoResult:
    steps: int
    seconds: float  # training time over every attempt that made these steps
    resumed_from: int  # the step a rerun continued from (0: a fresh start)
    earlier_seconds: float  # of ``seconds``, what earlier attempts spent (0: a fresh start)
    history: list[dict] = field(default_factory=list)  # TRL's logged rewards, margins, loss


def _completion_logprob(model: Chimera, tokenizer, prompt: list[dict], reply: list[dict],
                        device) -> float | None:
    """Sum of the log-probabilities of the reply's tokens (the assistant tokens SFT trains on)
    after the prompt; None when the conversation does not fit the model's context."""
    ids, is_reply = encode_conversation(tokenizer, [*prompt, *reply])
    if len(ids) > model.config.max_seq_len:
        return None
    tokens = torch.tensor([ids], device=device)
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens)[0][0, :-1].float(), dim=-1)
    targets = tokens[0, 1:]
    scored = torch.tensor(is_reply[1:], device=device)
    return float(logp.gather(1, targets[:, None])[:, 0][scored].sum())


def preference_accuracy(model: Chimera, tokenizer, records: Sequence[dict]) -> dict:
    """Share of pairs whose chosen reply the model finds likelier than the rejected one, and
    the mean margin in nats; pairs longer than the context are left out (counted)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    wins, margins, skipped = 0, [], 0
    for record in records:
        chosen = _completion_logprob(model, tokenizer, record["prompt"], record["chosen"],
                                     device)
        rejected = _completion_logprob(model, tokenizer, record["prompt"], record["rejected"],
                                       device)
        if chosen is None or rejected is None:
            skipped += 1
            continue
        wins += chosen > rejected
        margins.append(chosen - rejected)
    model.train(was_training)
    if not margins:
        raise ValueError(f"none of the {len(records)} preference pairs fits the model's "
                         f"context of {model.config.max_seq_len} tokens")
    return {"accuracy": wins / len(margins), "margin": sum(margins) / len(margins),
            "pairs": len(margins), "too_long": skipped}


def with_own_mistakes(model: Chimera, tokenizer, records: Sequence[dict],
                      max_new_tokens: int = QA_NEW_TOKENS, context: int | None = None,
                      on_answer: Callable[[int, int], None] | None = None
                      ) -> tuple[list[dict], int]:
    """``records`` with each rejected reply replaced by the model's own greedy reply wherever
    that reply is wrong (``trainers.answers``), and how many were replaced.

    These are on-policy negatives: the constructed wrong answer is one the model may never
    give, and a model that already prefers the right reply on most constructed pairs learns
    little from them, while its own mistakes are exactly what greedy answering gets wrong.
    Records need "expected" (and "others"), as the preference builders' ``with_answers``
    gives; a reply that repeats the chosen one or is empty, or a prompt that leaves no room for
    an answer in ``context``, keeps the constructed rejection.
    ``on_answer(done, total)`` is called after each question."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    was_training = model.training
    model.eval()
    mined, replaced = [], 0
    for number, record in enumerate(records, 1):
        if "expected" not in record:
            raise ValueError("a preference record without its expected answer: build them "
                             "with with_answers=True to mine the model's own mistakes")
        try:
            answer = reply(model, tokenizer, record["prompt"], sampling, context).strip()
        except ConversationError:
            answer = ""  # no room to answer in the context: the constructed rejection stays
        chosen = record["chosen"][-1]["content"]
        if answer and answer != chosen.strip() and \
                not answer_is_right(record["expected"], answer, record.get("others", ())):
            record = {**record, "rejected": [{"role": "assistant", "content": answer}]}
            replaced += 1
        mined.append(record)
        if on_answer is not None:
            on_answer(number, len(records))
    model.train(was_training)
    return mined, replaced


def training_pairs(model: Chimera, tokenizer, train: Sequence[dict], settings: DpoSettings,
                   saved: Path, on_answer: Callable[[int, int], None] | None = None
                   ) -> tuple[list[dict], int | None]:
    """The pairs DPO trains on, kept in ``saved`` (JSONL, TRL's format plus each question's
    answers: ``chimera dpo --data`` reads it): ``train``, or with ``settings.own_mistakes``
    ``with_own_mistakes(train)`` and how many rejected replies are the model's own (else
    None). A rerun on the same pairs reads them back instead of answering again."""
    wanted = [(r["prompt"], r["chosen"], settings.own_mistakes) for r in train]
    try:
        kept = [json.loads(line) for line in saved.read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError):
        kept = None
    if kept is not None and \
            [(r["prompt"], r["chosen"], "own_mistake" in r) for r in kept] == wanted:
        pairs = kept
    elif settings.own_mistakes:
        mined, _ = with_own_mistakes(model, tokenizer, train, QA_NEW_TOKENS,
                                     settings.max_length, on_answer)
        pairs = [{**pair, "own_mistake": pair["rejected"] != constructed["rejected"]}
                 for pair, constructed in zip(mined, train)]
    else:
        pairs = list(train)
    if pairs is not kept:
        text = "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)
        saved.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(saved, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return pairs, (sum(p["own_mistake"] for p in pairs) if settings.own_mistakes else None)


def _trl_config(settings: DpoSettings, checkpoint_dir: Path, device: str):
    from trl import DPOConfig

    losses = [settings.loss_type] + (["sft"] if settings.sft_weight else [])
    return DPOConfig(
        output_dir=str(checkpoint_dir), max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size, learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=min(settings.warmup_steps, settings.steps - 1),
        beta=settings.beta, loss_type=losses,
        loss_weights=[1.0, settings.sft_weight] if settings.sft_weight else None,
        max_length=settings.max_length, seed=settings.seed, data_seed=settings.seed,
        save_strategy="steps", save_steps=settings.checkpoint_every, save_total_limit=2,
        logging_steps=max(1, settings.steps // 20), report_to=[], disable_tqdm=True,
        use_cpu=device == "cpu", bf16=device.startswith("cuda") and torch.cuda.is_bf16_supported(),
        # The models are small enough to keep activations: no recompute (TRL's default is on;
        # activation_checkpointing is the name that replaced gradient_checkpointing).
        activation_checkpointing=False, dataloader_num_workers=0)


def _with_tokenizer_tokens(hf_model, tokenizer) -> None:
    """Give the model's configs the tokenizer's special tokens (the chat template's end of
    turn among them), as the trainer would, so that it has nothing to align and warn about."""
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(hf_model.config, name, value)
            if getattr(hf_model, "generation_config", None) is not None:
                setattr(hf_model.generation_config, name, value)


def _seconds_before(checkpoint: str | None) -> float:
    """The training seconds a checkpoint holds (0 for none, or one saved without its clock)."""
    try:
        return float(json.loads((Path(checkpoint) / SECONDS_FILE).read_text())["seconds"])
    except (TypeError, OSError, ValueError, KeyError):
        return 0.0


def _newest_checkpoint(checkpoint_dir: Path) -> tuple[str | None, int]:
    # Not transformers' get_last_checkpoint: that takes a folder a kill left half-written
    # (no trainer_state.json yet) for the newest, and fails on a folder not made yet.
    steps = sorted((int(p.name.split("-")[1]), p) for p in checkpoint_dir.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file())
    return (str(steps[-1][1]), steps[-1][0]) if steps else (None, 0)


def preference_tune(model: Chimera, tokenizer, train: Sequence[dict], settings: DpoSettings,
                    checkpoint_dir: Path, device: str = "cpu",
                    on_progress: Callable[[int, int, dict | None], None] | None = None
                    ) -> tuple[Chimera, DpoResult]:
    """DPO of ``model`` (policy and reference both start from it) on ``train`` records;
    returns the tuned native model. ``on_progress(step, total, logs)`` is called after every
    optimizer step (logs None) and with each of TRL's logs."""
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOTrainer

    from chimera.hf import from_native, to_native

    resume, resumed_from = _newest_checkpoint(checkpoint_dir)
    earlier = _seconds_before(resume)
    started = time.monotonic()

    class Reporter(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            # TRL keeps no clock across resumes: each checkpoint records the time it holds.
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            seconds = json.dumps({"seconds": earlier + time.monotonic() - started})
            atomic_write(folder / SECONDS_FILE, lambda tmp: Path(tmp).write_text(seconds))

        def on_step_end(self, args, state, control, **kwargs):
            if on_progress is not None:
                on_progress(state.global_step, state.max_steps, None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_progress is not None and logs:
                on_progress(state.global_step, state.max_steps, logs)

    datasets.disable_progress_bars()  # rich shows the progress; TRL's tqdm would interleave
    policy, reference = from_native(model).train(), from_native(model).eval()
    for hf_model in (policy, reference):
        _with_tokenizer_tokens(hf_model, tokenizer)
    rows = [{key: r[key] for key in ("prompt", "chosen", "rejected")} for r in train]
    trainer = DPOTrainer(model=policy, ref_model=reference, args=_trl_config(
        settings, checkpoint_dir, device), train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer, callbacks=[Reporter()])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; on_progress reports
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar at every checkpoint
    try:
        with warnings.catch_warnings():
            # TRL reads transformers' renamed property; nothing a user of ours can change.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                    FutureWarning)
            trainer.train(resume_from_checkpoint=resume)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = DpoResult(trainer.state.global_step, earlier + time.monotonic() - started,
                       resumed_from, earlier, history)
    return to_native(trainer.model).eval(), result
