"""The ``chimera`` subcommands that make and use models: promote, train, sft, generate, chat.

Registered on the main parser by ``cluster.cli.main``; like the rest of the CLI, each turns its
arguments into settings at once, calls library functions and reports bad input as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from rich.console import Console

from chimera.chat import ConversationError, decode_stream, reply_stream
from chimera.checkpoint import load_config, save_model
from chimera.config import get_preset
from chimera.generation import SamplingConfig, stream
from chimera.inference import TOKENIZER_DIR, load_pretrained
from chimera.model import param_counts_analytic
from cluster.app.promote import (
    PromoteSettings,
    promote,
    run_pretrain,
    run_sft,
    story_sampler,
    winner,
)
from cluster.app.rundir import STORE_DIR
from cluster.cli import argtypes
from cluster.cli.argtypes import parse_duration, parse_size
from cluster.cli.clock import seconds_since_launch
from cluster.cli.errors import CommandError, settings_errors
from cluster.ray.runtime import start_ray
from search.refine import RefineSettings
from trainers.fit import FitSettings
from trainers.instructions import conversations
from trainers.plateau import PLATEAU_PATIENCE
from trainers.pretrain import PretrainPlan, steps_for_tokens
from trainers.recipe import SCHEDULES, TrainHparams
from trainers.sft import load_conversations
from trainers.store import TokenStore


# ----------------------------------------------------------------------------- promote
def promote_settings(args: argparse.Namespace) -> PromoteSettings:
    return PromoteSettings(
        run_dir=args.run, candidate_id=args.genome, out=args.out,
        refine=RefineSettings(trials=args.trials, rungs=args.rungs, parallel=args.parallel),
        refine_tokens=args.refine_tokens, pretrain_tokens=args.pretrain_tokens,
        budget_seconds=args.budget, refine_share=args.refine_share, finalists=args.finalists,
        max_seq_len=args.max_seq_len, sft_steps=args.sft_steps,
        sft_conversations=args.sft_conversations, qa_questions=args.qa_questions,
        sft_hparams=dataclasses.replace(PromoteSettings.sft_hparams, seq_len=args.sft_seq_len,
                                        batch_size=args.sft_batch_size),
        pretrain_mix=args.pretrain_mix,
        dpo=args.dpo, dpo_pairs=args.dpo_pairs,
        dpo_settings=dataclasses.replace(PromoteSettings.dpo_settings, steps=args.dpo_steps,
                                         learning_rate=args.dpo_lr, beta=args.dpo_beta,
                                         sft_weight=args.dpo_sft_weight,
                                         own_mistakes=args.dpo_own_mistakes),
        train_workers=args.train_workers, in_process=args.in_process,
        address=args.address, device=args.device, compile=args.compile, seed=args.seed)


def cmd_promote(args: argparse.Namespace, console: Console) -> int:
    try:
        settings = promote_settings(args)
        metrics = promote(settings, console, seconds_since_launch())
    except settings_errors() as err:
        raise CommandError(str(err)) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: progress is saved; run the same command "
                      "again to resume")
        return 130
    qa = metrics["qa_accuracy"]
    preference = metrics.get("preference_accuracy")  # with --dpo: base -> SFT -> SFT+DPO
    answered = "question answering " + _progression(qa, preference is not None) \
        if qa["base"] is not None else "question answering not measured (report.md says why)"
    if preference is not None:
        answered += f", preference accuracy {_progression(preference, True)}"
    console.print(f"[bold green]promoted[/bold green] -> {settings.out_dir}  pretrained "
                  f"{metrics['pretrain']['val_bpb']:.4f} bpb, {answered}, "
                  f"{metrics['total_seconds'] / 60:.1f} min. Talk to it: chimera chat "
                  f"{settings.out_dir}")
    return 0


def _progression(shares: dict, dpo: bool) -> str:
    """Accuracies along the stages: base -> chat, or with --dpo base -> SFT -> SFT+DPO."""
    if not dpo:
        return f"{shares['base']:.0%} -> {shares['chat']:.0%}"
    return f"base {shares['base']:.0%} -> SFT {shares['sft']:.0%} -> DPO {shares['chat']:.0%}"


# ----------------------------------------------------------------------------- train
def _train_config(args: argparse.Namespace, vocab_size: int):
    if args.preset:
        config = get_preset(args.preset)
    elif args.config:
        config = load_config(args.config)
    else:
        _, genome, _ = winner(args.run, args.genome)
        config = genome.to_config(vocab_size, args.max_seq_len)
    return dataclasses.replace(config, vocab_size=vocab_size,
                               max_seq_len=max(args.max_seq_len, args.seq_len))


def train_hparams(args: argparse.Namespace) -> TrainHparams:
    return TrainHparams(
        learning_rate=args.lr, warmup_fraction=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, beta2=args.beta2, batch_size=args.batch_size,
        seq_len=args.seq_len, label_smoothing=args.label_smoothing, z_loss=args.z_loss,
        eval_batches=args.eval_batches, optimizer=args.optimizer)


def train_fit_settings(args: argparse.Namespace, steps: int) -> FitSettings:
    return FitSettings(
        steps=steps, grad_accum=args.grad_accum,
        eval_every=args.eval_every or max(1, steps // 10),
        checkpoint_every=args.checkpoint_every or max(1, steps // 10),
        keep_checkpoints=args.keep_checkpoints, compile=args.compile,
        keep_best=bool(args.plateau_decay), plateau_patience=args.plateau_decay)


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    out = Path(args.out)
    try:
        if args.store is None and args.run is None:
            raise CommandError("--store is needed unless --run names a run (whose store is used)")
        store = TokenStore.open(args.store or Path(args.run) / STORE_DIR)
        config = _train_config(args, store.vocab_size)
        hparams = train_hparams(args)
        steps = steps_for_tokens(args.tokens, hparams)
        plan = PretrainPlan(config, hparams, train_fit_settings(args, steps), args.seed)
        console.print(f"[bold]chimera train[/bold] {param_counts_analytic(config).total / 1e6:.2f}"
                      f"M parameters, {steps} steps x {hparams.batch_size} x {hparams.seq_len} "
                      f"tokens -> {out}")
        started = args.workers > 1 and start_ray(args.address)
        try:
            tokenizer = store.load_tokenizer()
            sampler = story_sampler(tokenizer, console, args.seed)
            model, result = run_pretrain(plan, store, out, console, args.workers, args.device,
                                         sampler=sampler)
        finally:
            if started:
                import ray  # only when this command started it

                ray.shutdown()
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    except settings_errors() as err:
        raise CommandError(str(err)) from None
    if result.interrupted:
        console.print(f"[yellow]interrupted[/yellow] at step {result.step}: checkpoint saved; "
                      f"run the same command again to resume")
        return 130
    bpb = store.bits_per_byte(result.val_loss, "val")
    console.print(f"[bold green]done[/bold green]: {result.step} steps, validation "
                  f"{result.val_loss:.4f} nats/token = {bpb:.4f} bpb -> {out}")
    return 0


# ----------------------------------------------------------------------------- sft
def cmd_sft(args: argparse.Namespace, console: Console) -> int:
    out = Path(args.out)
    try:
        model, tokenizer = load_pretrained(args.model, device=args.device)
        if args.data:
            train = [{"messages": m} for m in load_conversations(args.data)]
            val = ([{"messages": m} for m in load_conversations(args.val)] if args.val
                   else train[-max(1, len(train) // 20):])
        else:  # the built-in story instructions
            train = conversations(args.conversations, args.seed)
            val = conversations(max(64, args.conversations // 20), args.seed, heldout=True)
        hparams = dataclasses.replace(PromoteSettings.sft_hparams, learning_rate=args.lr,
                                      batch_size=args.batch_size, seq_len=args.seq_len)
        model, result, dropped = run_sft(model.train(), tokenizer, train, val, hparams,
                                         args.steps, out, console, args.seed, args.device)
        if result.interrupted:
            console.print(f"[yellow]interrupted[/yellow] at step {result.step}: checkpoint "
                          f"saved; run the same command again to resume")
            return 130
        save_model(model, out)
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    except settings_errors() as err:
        raise CommandError(str(err)) from None
    console.print(f"[bold green]done[/bold green]: {result.step} steps on {len(train)} "
                  f"conversations ({dropped} too long for --seq-len, left out); validation "
                  f"loss on assistant tokens {result.val_loss:.4f} -> {out}")
    return 0


# ----------------------------------------------------------------------------- generate, chat
def _sampling(args: argparse.Namespace):
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    try:
        sampling = _sampling(args)
        model, tokenizer = load_pretrained(args.model, args.quantize)
        if args.chat:
            pieces = reply_stream(model, tokenizer, [{"role": "user", "content": args.prompt}],
                                  sampling)
        else:
            prompt = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
            if not prompt:
                raise CommandError("--prompt must not be empty")
            sys.stdout.write(args.prompt)
            pieces = decode_stream(tokenizer, stream(model, prompt, sampling))
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except settings_errors() as err:
        raise CommandError(str(err)) from None
    return 0


def cmd_chat(args: argparse.Namespace, console: Console) -> int:
    try:
        sampling = _sampling(args)
        model, tokenizer = load_pretrained(args.model, args.quantize)
    except settings_errors() as err:
        raise CommandError(str(err)) from None
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    console.print(f"[bold]chimera chat[/bold] {args.model}  (/reset starts over, /quit or "
                  f"Ctrl+D leaves)")
    while True:
        try:
            text = console.input("[bold cyan]you>[/bold cyan] ")
        except EOFError:
            console.print()
            return 0
        if text.strip() in ("/quit", "/exit"):
            return 0
        if text.strip() == "/reset":
            history = []
            console.print("[dim]new conversation[/dim]")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        console.print("[bold magenta]chimera>[/bold magenta] ", end="")
        answer = ""
        try:
            for piece in reply_stream(model, tokenizer, system + history, sampling):
                answer += piece
                console.out(piece, end="", highlight=False)
        except ConversationError as err:
            history.pop()
            console.print(f"\n[red]{err}[/red]")
            continue
        console.print()
        history.append({"role": "assistant", "content": answer})


# ----------------------------------------------------------------------------- parser
def _add_sampling(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=argtypes.positive_int, default=200)
    group.add_argument("--temperature", type=argtypes.finite_float, default=0.8, help="0: greedy")
    group.add_argument("--top-k", type=argtypes.positive_int, default=None)
    group.add_argument("--top-p", type=argtypes.finite_float, default=0.95)
    group.add_argument("--repetition-penalty", type=argtypes.positive_float, default=1.0)
    group.add_argument("--seed", type=argtypes.seed, default=None)
    group.add_argument("--quantize", type=int, choices=[8], default=None,
                       help="dynamic int8 linear layers (faster CPU inference)")


def register(commands) -> None:
    """Add the model subcommands to the main parser's subcommands."""
    _register_promote(commands)
    _register_train(commands)
    _register_sft(commands)
    _register_generation(commands)


def _register_promote(commands) -> None:
    """``chimera promote``."""
    promote = commands.add_parser(
        "promote", help="turn a run's best genome into a trained chat model",
        description="Refine the winner's training hyperparameters with Optuna (TPE + "
                    "Hyperband), pretrain it, fine-tune it for chat, evaluate it and write a "
                    "model directory with report.md. Run the same command again to resume: "
                    "the stages recorded as done in OUT/promote-state.json are skipped, the "
                    "running one continues from its checkpoint.")
    promote.add_argument("run", metavar="RUN", help="a run directory of chimera evolve")
    promote.add_argument("--genome", type=argtypes.positive_int, default=None, metavar="ID",
                         help="candidate id to promote (default: the best)")
    promote.add_argument("--out", default=None, help="model directory (default RUN/promoted)")
    promote.add_argument("--trials", type=argtypes.positive_int,
                         default=PromoteSettings.refine.trials, help="Optuna trials")
    promote.add_argument("--rungs", type=argtypes.positive_int,
                         default=PromoteSettings.refine.rungs,
                         help="validation reports per trial (Hyperband's resource)")
    promote.add_argument("--parallel", type=argtypes.positive_int,
                         default=PromoteSettings.refine.parallel, help="trials at once on Ray")
    promote.add_argument("--refine-tokens", type=parse_size, default=None,
                         help="training tokens per trial (default: --pretrain-tokens)")
    promote.add_argument("--pretrain-tokens", type=parse_size,
                         default=PromoteSettings.pretrain_tokens)
    promote.add_argument("--budget", type=parse_duration, default=None, metavar="TIME",
                         help="wall clock for the whole promote, e.g. 20m: the stages are sized "
                              "to it on this machine (replaces --pretrain-tokens and "
                              "--refine-tokens; --sft-steps becomes a cap)")
    promote.add_argument("--refine-share", type=argtypes.fraction,
                         default=PromoteSettings.refine_share, metavar="FRACTION",
                         help="with --budget: refinement's share of it (default: %(default)s, "
                              "none)")
    promote.add_argument("--finalists", type=argtypes.positive_int,
                         default=PromoteSettings.finalists, metavar="N",
                         help="with --budget: up to N candidates of growing size share "
                              "pretraining, the best is the base (default: %(default)s, off)")
    promote.add_argument("--max-seq-len", type=argtypes.positive_int,
                         default=PromoteSettings.max_seq_len, help="the chat model's context")
    promote.add_argument("--sft-steps", type=argtypes.positive_int,
                         default=PromoteSettings.sft_steps)
    promote.add_argument("--sft-conversations", type=argtypes.positive_int,
                         default=PromoteSettings.sft_conversations)
    promote.add_argument("--sft-seq-len", type=argtypes.positive_int,
                         default=PromoteSettings.sft_hparams.seq_len,
                         help="longest conversation, in tokens (longer ones are left out)")
    promote.add_argument("--sft-batch-size", type=argtypes.positive_int,
                         default=PromoteSettings.sft_hparams.batch_size)
    promote.add_argument("--pretrain-mix", type=argtypes.share_below_one,
                         default=PromoteSettings.pretrain_mix,
                         help="share of each fine-tuning batch that is plain corpus text, so "
                              "the chat model keeps the corpus (0: conversations only)")
    promote.add_argument("--qa-questions", type=argtypes.positive_int,
                         default=PromoteSettings.qa_questions,
                         help="held-out questions for the accuracy in report.md (with --dpo: "
                              "as many held-out preference pairs)")
    _add_dpo(promote)
    promote.add_argument("--train-workers", type=argtypes.positive_int,
                         default=PromoteSettings.train_workers,
                         help="Ray Train workers for pretraining (DDP); 1: this process")
    promote.add_argument("--in-process", action="store_true",
                         help="run refinement trials here, one at a time, without Ray")
    promote.add_argument("--address", default=None, help="a Ray cluster (default: local)")
    promote.add_argument("--device", default=PromoteSettings.device, help="cpu or cuda")
    promote.add_argument("--compile", action="store_true", help="torch.compile pretraining")
    promote.add_argument("--seed", type=argtypes.seed, default=PromoteSettings.seed)
    promote.set_defaults(handler=cmd_promote)


def _add_dpo(promote: argparse.ArgumentParser) -> None:
    """``chimera promote``'s preference-tuning flags."""
    dpo = promote.add_argument_group(
        "preference tuning", "with --dpo: DPO of the chat model after fine-tuning, on pairs of "
        "the right and a wrong answer to reading questions about the run's corpus; the "
        "SFT+DPO model is OUT's chat model, the SFT one is kept in OUT/sft (not sized by "
        "--budget)")
    dpo.add_argument("--dpo", action="store_true", help="add the DPO stage")
    dpo.add_argument("--dpo-steps", type=argtypes.positive_int,
                     default=PromoteSettings.dpo_settings.steps,
                     help=f"optimizer steps of {PromoteSettings.dpo_settings.batch_size} pairs "
                          f"(default: %(default)s)")
    dpo.add_argument("--dpo-lr", type=argtypes.positive_float,
                     default=PromoteSettings.dpo_settings.learning_rate,
                     help="learning rate (default: %(default)s)")
    dpo.add_argument("--dpo-beta", type=argtypes.positive_float,
                     default=PromoteSettings.dpo_settings.beta,
                     help="DPO's beta: a larger one keeps the model closer to the SFT model "
                          "(default: %(default)s)")
    dpo.add_argument("--dpo-sft-weight", type=argtypes.non_negative_float,
                     default=PromoteSettings.dpo_settings.sft_weight,
                     help="add the chosen reply's NLL with this weight (RPO); 0: plain DPO "
                          "(default: %(default)s)")
    dpo.add_argument("--dpo-own-mistakes", action=argparse.BooleanOptionalAction,
                     default=PromoteSettings.dpo_settings.own_mistakes,
                     help="rejected = the SFT model's own wrong answer to the training "
                          "question where it gives one (default: %(default)s)")
    dpo.add_argument("--dpo-pairs", type=argtypes.positive_int,
                     default=PromoteSettings.dpo_pairs,
                     help="training preference pairs (default: %(default)s)")


def _register_train(commands) -> None:
    """``chimera train``."""
    train = commands.add_parser(
        "train", help="pretrain one genome or preset on a token store",
        description="Full pretraining with checkpoints (resume by running again; Ctrl+C "
                    "saves). Writes a model directory.")
    what = train.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help="a built-in preset (vocabulary set to the store's)")
    what.add_argument("--config", metavar="MODEL_DIR", help="the config of a model directory")
    what.add_argument("--run", metavar="RUN", help="a run's best genome (or --genome ID)")
    train.add_argument("--genome", type=argtypes.positive_int, default=None, metavar="ID")
    train.add_argument("--store", default=None,
                       help="a token store (chimera data prepare); default with --run: its store")
    train.add_argument("--out", required=True, help="model directory to write")
    train.add_argument("--tokens", type=parse_size, default=2_000_000,
                       help="training tokens (e.g. 2M)")
    train.add_argument("--lr", type=argtypes.positive_float, default=TrainHparams.learning_rate)
    argtypes.add_optimizer_option(train)
    train.add_argument("--warmup", type=argtypes.non_negative_float,
                       default=TrainHparams.warmup_fraction,
                       help="warmup fraction")
    train.add_argument("--schedule", choices=SCHEDULES, default=TrainHparams.schedule)
    train.add_argument("--weight-decay", type=argtypes.non_negative_float,
                       default=TrainHparams.weight_decay)
    train.add_argument("--beta2", type=argtypes.positive_float, default=TrainHparams.beta2)
    train.add_argument("--batch-size", type=argtypes.positive_int,
                       default=TrainHparams.batch_size,
                       help="global, in sequences")
    train.add_argument("--grad-accum", type=argtypes.positive_int,
                       default=FitSettings.grad_accum)
    train.add_argument("--seq-len", type=argtypes.positive_int, default=TrainHparams.seq_len)
    train.add_argument("--max-seq-len", type=argtypes.positive_int,
                       default=PromoteSettings.max_seq_len)
    train.add_argument("--label-smoothing", type=argtypes.non_negative_float,
                       default=TrainHparams.label_smoothing)
    train.add_argument("--z-loss", type=argtypes.non_negative_float,
                       default=TrainHparams.z_loss)
    train.add_argument("--eval-every", type=argtypes.non_negative_int, default=0,
                       help="steps (default: 10 evals)")
    train.add_argument("--plateau-decay", type=argtypes.non_negative_int,
                       default=FitSettings.plateau_patience, metavar="EVALS",
                       help="after this many evaluations without a new best, cool the rate "
                            "down to the best's token count, stop and keep the best weights "
                            f"(promote's pretraining uses {PLATEAU_PATIENCE}; default: off)")
    train.add_argument("--eval-batches", type=argtypes.positive_int,
                       default=TrainHparams.eval_batches)
    train.add_argument("--checkpoint-every", type=argtypes.non_negative_int, default=0)
    train.add_argument("--keep-checkpoints", type=argtypes.positive_int,
                       default=FitSettings.keep_checkpoints)
    train.add_argument("--workers", type=argtypes.positive_int, default=1,
                       help="Ray Train DDP workers")
    train.add_argument("--address", default=None, help="a Ray cluster (default: local)")
    train.add_argument("--device", default="cpu")
    train.add_argument("--compile", action="store_true")
    train.add_argument("--seed", type=argtypes.seed, default=0)
    train.set_defaults(handler=cmd_train)


def _register_sft(commands) -> None:
    """``chimera sft``."""
    sft = commands.add_parser(
        "sft", help="chat fine-tune a model directory",
        description="Fine-tune on conversations (JSONL of {\"messages\": [...]}, or the "
                    "built-in story instructions), loss on assistant tokens only.")
    sft.add_argument("model", metavar="MODEL", help="a model directory")
    sft.add_argument("--out", required=True)
    sft.add_argument("--data", default=None, help="training conversations (JSONL)")
    sft.add_argument("--val", default=None, help="validation conversations (JSONL)")
    sft.add_argument("--conversations", type=argtypes.positive_int,
                     default=PromoteSettings.sft_conversations,
                     help="built-in conversations when no --data")
    sft.add_argument("--steps", type=argtypes.positive_int, default=PromoteSettings.sft_steps)
    sft.add_argument("--lr", type=argtypes.positive_float,
                     default=PromoteSettings.sft_hparams.learning_rate)
    sft.add_argument("--batch-size", type=argtypes.positive_int,
                     default=PromoteSettings.sft_hparams.batch_size)
    sft.add_argument("--seq-len", type=argtypes.positive_int,
                     default=PromoteSettings.sft_hparams.seq_len)
    sft.add_argument("--device", default="cpu")
    sft.add_argument("--seed", type=argtypes.seed, default=0)
    sft.set_defaults(handler=cmd_sft)


def _register_generation(commands) -> None:
    """``chimera generate and chimera chat``."""
    generate = commands.add_parser("generate", help="generate text from a model directory")
    generate.add_argument("model", metavar="MODEL")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true",
                          help="send the prompt as a user message and print the reply")
    _add_sampling(generate)
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="talk to a chat model in the terminal")
    chat.add_argument("model", metavar="MODEL")
    chat.add_argument("--system", default=None, help="a system message")
    _add_sampling(chat)
    chat.set_defaults(handler=cmd_chat)
