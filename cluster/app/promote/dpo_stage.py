"""The optional stage of ``chimera promote --dpo``: preference tuning (DPO, ``trainers.dpo``) of
the chat model after fine-tuning, on pairs of the right and a wrong answer to reading questions
about the run's corpus (``instruction_data.run_preferences``), and its part of the evaluation.

The DPO model takes the chat model's place at OUT's top level; the SFT model moves to OUT/sft
first. Each step is ordered so that a kill at any moment leaves a readable SFT model: sft/ is
written, then recorded (the sft record's "model" says where the SFT model is), then DPO trains
(TRL's checkpoints under OUT/checkpoints/dpo, resumed by a rerun), then the top level is
replaced (save_model writes each file atomically), and only then is the stage recorded as done.
"""

from __future__ import annotations

import dataclasses
import time

from chimera.checkpoint import load_model, save_model
from chimera.inference import TOKENIZER_DIR
from chimera.model import Chimera
from cluster.app.promote.instruction_data import heldout_bpb, run_preferences
from cluster.app.promote.records import StageRecords
from cluster.app.promote.settings import PromoteError, PromoteSettings
from cluster.app.promote.stages import DpoProgress
from trainers.dpo import (
    CHECKPOINTS,
    PAIRS_FILE,
    DpoSettings,
    loss_label,
    preference_accuracy,
    preference_tune,
    training_pairs,
)
from trainers.preferences import PreferenceDataError
from trainers.sft import QA_NEW_TOKENS, encode_conversation, qa_accuracy

SFT_DIR = "sft"
PREFLIGHT_PAIRS = 16  # training pairs the preflight builds to see that some fit the context
HISTORY_KEYS = ("step", "loss", "rewards/accuracies", "rewards/margins")


def tuning_settings(settings: PromoteSettings) -> DpoSettings:
    """What ``preference_tune`` runs with: ``--dpo-*``, the promote's context and seed, and a
    checkpoint at least every quarter of the steps (as fine-tuning's), so a kill loses little."""
    dpo = settings.dpo_settings
    return dataclasses.replace(dpo, max_length=settings.max_seq_len, seed=settings.seed,
                               checkpoint_every=max(1, min(dpo.checkpoint_every,
                                                           dpo.steps // 4)))


def sft_dir(records: StageRecords) -> str:
    """Where, relative to OUT, the SFT model is: "." until a DPO stage moved it to sft/."""
    return records.done("sft").get("model", ".")


def _fits(tokenizer, record: dict, context: int) -> bool:
    return all(len(encode_conversation(tokenizer, [*record["prompt"], *record[reply]])[0])
               <= context for reply in ("chosen", "rejected"))


def check_preferences(settings: PromoteSettings, tokenizer, records: StageRecords
                      ) -> list[dict]:
    """The preflight's part with --dpo: the held-out pairs the evaluation scores (returned) and,
    unless DPO is done, a few training pairs must exist and one of each fit --max-seq-len.
    ``tokenizer``: one with the chat template fine-tuning will give it."""
    context, checked = settings.max_seq_len, {}
    try:
        checked["held-out"], _ = run_preferences(settings.run_dir, settings.qa_questions,
                                                  settings.seed, heldout=True, context=context)
        if records.done("dpo") is None:
            checked["training"], _ = run_preferences(
                settings.run_dir, min(settings.dpo_pairs, PREFLIGHT_PAIRS), settings.seed,
                heldout=False, context=context)
    except PreferenceDataError as err:
        raise PromoteError(f"--dpo: {err}; promote without --dpo") from None
    for kind, pairs in checked.items():
        if not any(_fits(tokenizer, pair, context) for pair in pairs):
            raise PromoteError(f"--dpo: none of the first {len(pairs)} {kind} preference "
                               f"pairs fits --max-seq-len {context} with this tokenizer; raise "
                               f"--max-seq-len, or promote without --dpo")
    return checked["held-out"]


def run_dpo(ctx, sft_model: Chimera, tokenizer) -> tuple[Chimera, dict]:
    """4. Preference tuning of ``sft_model`` (recorded, or tuned now); returns the DPO model
    and the stage's record. ``ctx``: the pipeline's run (settings, console, records, wanted)."""
    settings, out, records = ctx.settings, ctx.out, ctx.records
    if records.done("dpo") is not None:
        ctx.skipped("dpo", f"the DPO model is in {out}, the SFT one in {out / SFT_DIR}")
        return load_model(out, device=settings.device), records.done("dpo")
    t0 = time.perf_counter()
    ctx.console.rule("preference tuning (DPO)")
    records.begin("dpo", ctx.wanted["dpo"])
    if sft_dir(records) == ".":
        # Before DPO's model replaces it at the top level; recorded only once complete, so
        # a kill while writing it leaves the top-level copy as the one the record names.
        save_model(sft_model, out / SFT_DIR)
        tokenizer.save_pretrained(str(out / SFT_DIR / TOKENIZER_DIR))
        records.moved("sft", SFT_DIR)
    train, source = run_preferences(settings.run_dir, settings.dpo_pairs, settings.seed,
                                     heldout=False, context=settings.max_seq_len,
                                     with_answers=True)
    dpo = tuning_settings(settings)
    ctx.console.print(f"  {len(train):,} preference pairs ({source}), {dpo.steps} steps of "
                      f"{dpo.batch_size}, loss {loss_label(dpo.loss_type, dpo.sft_weight)}, "
                      f"beta {dpo.beta}, learning rate {dpo.learning_rate:g}",
                      highlight=False)
    with DpoProgress(ctx.console, dpo.steps) as progress:
        train, own = training_pairs(sft_model, tokenizer, train, dpo, out / PAIRS_FILE,
                                    progress.answering)
        if own is not None:
            ctx.console.print(f"  own mistakes: the SFT model answers {own} of {len(train)} "
                              f"training questions wrong; those are the rejected replies",
                              highlight=False)
        tuned, result = preference_tune(sft_model, tokenizer, train, dpo, out / CHECKPOINTS,
                                        settings.device, on_progress=progress)
    if result.resumed_from:
        ctx.console.print(f"  resumed from DPO step {result.resumed_from}", highlight=False)
    save_model(tuned, out)  # the tokenizer at the top level is the SFT model's, unchanged
    records.finish("dpo", {
        "model": ".", "sft_model": SFT_DIR, "steps": result.steps, "pairs": len(train),
        "own_mistakes": own,
        "source": source, "settings": dataclasses.asdict(dpo),
        "resumed_from_step": result.resumed_from,
        "history": [{k: entry[k] for k in HISTORY_KEYS if k in entry}
                    for entry in result.history],
        # This attempt, and the training time of any killed one it resumed.
        "seconds": time.perf_counter() - t0 + result.earlier_seconds})
    return tuned, records.done("dpo")


def evaluate_dpo(ctx, evaluation, base_for_chat: Chimera, sft_model: Chimera,
                 chat_model: Chimera, tokenizer, hparams, qa_items: list[dict]) -> dict:
    """The evaluation's part with --dpo: the SFT model's held-out bpb and question answering,
    and the held-out preference accuracy of the base (with the chat tokens), SFT and DPO
    models. Returns what the metrics get (``metrics_of``'s input)."""
    settings = ctx.settings
    pairs = evaluation.preference_pairs
    preference = {name: preference_accuracy(model, tokenizer, pairs) for name, model in
                  (("base", base_for_chat), ("sft", sft_model), ("chat", chat_model))}
    qa_sft = qa_accuracy(sft_model, tokenizer, qa_items, QA_NEW_TOKENS,
                         context=settings.max_seq_len) if qa_items else None
    bpb_sft = heldout_bpb(sft_model, ctx.store, hparams)
    ctx.console.print(
        "  held-out preference accuracy: " + ", ".join(
            f"{name} {p['accuracy']:.0%}" for name, p in
            (("base", preference["base"]), ("SFT", preference["sft"]),
             ("SFT+DPO", preference["chat"]))) + f" ({preference['chat']['pairs']} pairs)"
        + ("" if qa_sft is None else f"; question answering SFT {qa_sft:.0%}")
        + f"; held-out text SFT {bpb_sft:.4f} bpb", highlight=False)
    return {"preference": preference, "qa_sft": qa_sft, "bpb_sft": bpb_sft}


def dpo_metrics(record: dict, measured: dict, source: str) -> dict:
    """metrics.json's "dpo" and "preference_accuracy" sections."""
    preference = measured["preference"]
    history = record["history"]
    return {
        "dpo": {"steps": record["steps"], "pairs": record["pairs"],
                "own_mistakes": record.get("own_mistakes"),
                "source": record.get("source", source), "settings": record["settings"],
                "seconds": record["seconds"],
                "resumed_from_step": record.get("resumed_from_step", 0),
                "history": {"logs": len(history), "first": history[0] if history else None,
                            "last": history[-1] if history else None, "curve": history}},
        "preference_accuracy": {
            **{name: preference[name]["accuracy"] for name in ("base", "sft", "chat")},
            "margin": {name: preference[name]["margin"] for name in ("base", "sft", "chat")},
            "pairs": preference["chat"]["pairs"], "too_long": preference["chat"]["too_long"],
            "source": source},
    }
