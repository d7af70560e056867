"""A compute-matched end-to-end bench: the Chimera pipeline against nanoGPT-style and preset
baselines, each given the same wall clock on this machine, scored on the same held-out documents
in bits per byte.

Before any method runs, seeded held-out documents (5%, at least 50 unless the corpus has fewer
than 500, at most ~60 KB; or the documents of --val) leave the corpus; the rest, WORK/train.txt,
is all any method sees. One (method, seed) job at a time, each in its own subprocess:

  chimera        chimera evolve (--evolve-share of the budget), then chimera promote in the wall
                 clock left; its base model (and chat model) scored
  nanogpt        bench/nanogpt.py's ~1M-parameter GPT on a store of train.txt with Chimera's
                 tokenizer settings (BPE, 1024), its best validation state kept
  nanogpt-sweep  widths 96-192 x dropout 0-0.2 (5 configs, first seed only), each the full
                 budget; the default (the nanogpt job) counts as a member
  tiny, mini     the Chimera presets pretrained on that store for the budget, no search

Each held-out document is scored alone: end-of-text first (the store packs every document after
one), then its tokens in chunks of the model's training context; bits per byte is the summed
negative log-likelihood in bits over the documents' UTF-8 bytes, whatever the tokenizer.
Finished jobs write WORK/results/JOB-seedN.json; a rerun with the same --work skips them (an
unfinished one starts over). The table is printed and written to WORK/summary.md.

    python bench/end_to_end.py --corpus data/tinyshakespeare.txt --budget 30m --seeds 0 1 2
    python bench/end_to_end.py --corpus FILE --quick --methods nanogpt tiny   # smoke, ~3 min
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: import the packages, not a sibling bench module
    sys.path[0] = str(REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.nanogpt import (  # noqa: E402
    GPT,
    NANOGPT_HPARAMS,
    GPTConfig,
    sweep_config,
    train_for_seconds,
)
from chimera.checkpoint import atomic_write, load_model  # noqa: E402
from chimera.config import get_preset  # noqa: E402
from chimera.inference import load_pretrained  # noqa: E402
from chimera.model import Chimera  # noqa: E402
from chimera.tokenizer import END_OF_TEXT, end_of_text_id  # noqa: E402
from trainers.corpus import CorpusSpec, Separator, corpus_fingerprint, iter_documents  # noqa: E402
from trainers.plateau import PLATEAU_PATIENCE  # noqa: E402
from trainers.recipe import TrainHparams  # noqa: E402
from trainers.store import (  # noqa: E402
    SplitConfig,
    TokenStore,
    prepare_store,
    tokenizer_for,
    tokenizer_recipe,
)

METHODS = ("chimera", "nanogpt", "nanogpt-sweep", "tiny", "mini")
PRESETS = ("tiny", "mini")
SWEEP = ((96, 0.0), (128, 0.0), (128, 0.2), (192, 0.1), (192, 0.2))  # (128, 0.1) is nanogpt's
DEFAULT_GPT = (GPTConfig.d_model, GPTConfig.dropout)
TOKENIZER, VOCAB_SIZE = "bpe", 1024  # chimera evolve's defaults, given to every method
HELD_OUT_FRACTION, HELD_OUT_MIN_DOCS, HELD_OUT_MAX_BYTES = 0.05, 50, 60_000
QUICK_BUDGET, QUICK_CORPUS_BYTES = "40s", 300_000
QUICK_EVOLVE_FLAGS = ["--candidate-tokens", "20000"]
MIN_PROMOTE_SECONDS = 60  # below this a promote cannot even start its stages
TRAIN_FILE, HELD_OUT_FILE, BENCH_FILE, STORE_DIR = ("train.txt", "heldout.json", "bench.json",
                                                    "store")
JOB_FLAG = "--job"  # the child process's entry: one job, then exit
_EOT_LINE = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*$", re.MULTILINE)


# ----------------------------------------------------------------------------- held-out split
def hold_out(documents: list[str], seed: int, wanted: int | None = None) -> list[int]:
    """Indices of the held-out documents: a seeded shuffle taken in order until ``wanted``
    (default 5%, at least 50 but at most a tenth) are drawn or the next would pass the byte
    cap. Stopping at the cap, instead of skipping long documents, keeps the draw unbiased."""
    if wanted is None:
        wanted = min(max(HELD_OUT_MIN_DOCS, math.ceil(HELD_OUT_FRACTION * len(documents))),
                     max(1, len(documents) // 10))
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    held, size = [], 0
    for index in order[:wanted]:
        size += len(documents[index].encode())
        if held and size > HELD_OUT_MAX_BYTES:
            break
        held.append(index)
    return sorted(held)


def detect_separator(source: str) -> Separator:
    """Blank lines split a text file that has no ``<|endoftext|>`` line (tinyshakespeare)."""
    path = Path(source)
    if path.is_file() and not _EOT_LINE.search(path.read_text(errors="replace")):
        return Separator.BLANK_LINE
    return Separator.END_OF_TEXT


def _documents(source: str, separator: Separator, quick: bool) -> list[str]:
    documents, size = [], 0
    for document in iter_documents(CorpusSpec(source, separator=separator)):
        documents.append(document)
        size += len(document.encode())
        if quick and size >= QUICK_CORPUS_BYTES:
            break
    return documents


def prepare_bench(args: argparse.Namespace, work: Path) -> dict:
    """Split the corpus (once per WORK) into WORK/train.txt and WORK/heldout.json; refuse a WORK
    made from other inputs, whose results would not compare with these. A WORK that holds only
    bench.json and results/ (a long bench kept between machines: its split is seeded) gets its
    two files back, checked against the counts bench.json recorded."""
    separator = Separator(args.separator) if args.separator != "auto" \
        else detect_separator(args.corpus)
    identity = {"corpus": str(Path(args.corpus).resolve()), "separator": separator.value,
                "corpus_fingerprint": corpus_fingerprint(CorpusSpec(args.corpus,
                                                                    separator=separator)),
                "val": args.val and str(Path(args.val).resolve()),
                "val_fingerprint": args.val and corpus_fingerprint(
                    CorpusSpec(args.val, separator=detect_separator(args.val))),
                "quick": args.quick,
                "budget_seconds": args.budget, "evolve_share": args.evolve_share,
                "split_seed": args.split_seed, "evolve_args": args.evolve_args}
    recorded = None
    if (work / BENCH_FILE).is_file():
        recorded = json.loads((work / BENCH_FILE).read_text())
        differs = [k for k, v in identity.items() if recorded["identity"].get(k) != v]
        if differs:
            raise SystemExit(f"{work} holds a bench with other {', '.join(differs)}; use another "
                             f"--work (or the same settings to resume it)")
        if (work / TRAIN_FILE).is_file() and (work / HELD_OUT_FILE).is_file():
            return recorded
    held, train = _split(args, separator)
    bench = {"identity": identity, "held_out_documents": len(held),
             "held_out_bytes": sum(len(d.encode()) for d in held),
             "train_documents": len(train), "train_bytes": sum(len(d.encode()) for d in train)}
    if recorded is not None and recorded != bench:
        raise SystemExit(f"{work}: the split made now differs from the one bench.json records "
                         f"(another version of the splitter?); use another --work")
    work.mkdir(parents=True, exist_ok=True)
    # Written with end-of-text lines, read back by every method with that separator: the same
    # documents, whatever separated them in the corpus.
    atomic_write(work / TRAIN_FILE,
                 lambda tmp: Path(tmp).write_text(f"\n{END_OF_TEXT}\n".join(train) + "\n"))
    _write_json(work / HELD_OUT_FILE, {"documents": held})
    _write_json(work / BENCH_FILE, bench)
    return bench


def _split(args: argparse.Namespace, separator: Separator) -> tuple[list[str], list[str]]:
    """The held-out documents and the training documents, seeded by --split-seed."""
    corpus = _documents(args.corpus, separator, args.quick)
    if args.val:
        pool = _documents(args.val, detect_separator(args.val), quick=False)
        return [pool[i] for i in hold_out(pool, args.split_seed, len(pool))], corpus
    chosen = set(hold_out(corpus, args.split_seed))
    return ([d for i, d in enumerate(corpus) if i in chosen],
            [d for i, d in enumerate(corpus) if i not in chosen])


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_documents(logits_of, encode, documents: list[str], context: int, bos_id: int | None,
                    batch_size: int = 16) -> dict:
    """Held-out bits per byte, shared by every method: ``logits_of(ids (B, T)) -> (B, T, V)``,
    ``encode(text) -> ids``. Each document is scored alone, ``bos_id`` (when not None) first,
    in non-overlapping chunks of at most ``context`` inputs; chunks are right-padded into
    batches, which a causal model's real positions never see."""
    chunks = []
    for text in documents:
        ids = ([bos_id] if bos_id is not None else []) + list(encode(text))
        chunks += [ids[start:start + context + 1] for start in range(0, len(ids) - 1, context)]
    chunks.sort(key=len)  # similar lengths together: little padding
    bits, scored = 0.0, 0
    for first in range(0, len(chunks), batch_size):
        group = chunks[first:first + batch_size]
        tokens = torch.zeros(len(group), max(map(len, group)), dtype=torch.long)
        mask = torch.zeros(len(group), tokens.shape[1] - 1)
        for row, chunk in enumerate(group):
            tokens[row, :len(chunk)] = torch.tensor(chunk)
            mask[row, :len(chunk) - 1] = 1
        logits = logits_of(tokens[:, :-1]).float()
        nats = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        bits += float((nats * mask.flatten()).sum()) / math.log(2)
        scored += int(mask.sum())
    size = sum(len(text.encode()) for text in documents)
    return {"bpb": bits / size, "bits": bits, "bytes": size, "tokens": scored,
            "documents": len(documents)}


def score_model(model: torch.nn.Module, tokenizer, documents: list[str], context: int) -> dict:
    """``score_documents`` for a model returning (logits, cache) and a Chimera tokenizer (ids as
    the token store makes them, end-of-text first)."""
    model.eval()
    backend = tokenizer.backend_tokenizer
    return score_documents(lambda ids: model(ids)[0],
                           lambda text: backend.encode(text, add_special_tokens=False).ids,
                           documents, context, end_of_text_id(tokenizer))


def held_out_documents(work: Path) -> list[str]:
    return json.loads((work / HELD_OUT_FILE).read_text())["documents"]


# ----------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    name: str  # what trains: chimera, nanogpt, nanogpt-d96-drop0, tiny, mini
    method: str  # the table row it belongs to
    seed: int

    @property
    def stem(self) -> str:
        return f"{self.name}-seed{self.seed}"


def sweep_name(d_model: int, dropout: float) -> str:
    return f"nanogpt-d{d_model}-drop{dropout:g}"


def jobs_for(methods: list[str], seeds: list[int]) -> list[Job]:
    """Every method for every seed, but the sweep (each member a full budget) for the first."""
    jobs = []
    for method in methods:
        if method == "nanogpt-sweep":
            jobs += [Job(sweep_name(d, p), method, seeds[0]) for d, p in SWEEP]
        else:
            jobs += [Job(method, method, seed) for seed in seeds]
    return jobs


def baseline(name: str, vocab_size: int) -> tuple[torch.nn.Module, TrainHparams]:
    """The model and recipe of a baseline job (a preset trains as ``chimera train`` would)."""
    if name in PRESETS:
        return Chimera(replace(get_preset(name), vocab_size=vocab_size)), TrainHparams()
    match = re.fullmatch(r"nanogpt-d(\d+)-drop([\d.]+)", name)
    d_model, dropout = (int(match[1]), float(match[2])) if match else DEFAULT_GPT
    return GPT(sweep_config(vocab_size, d_model, dropout)), NANOGPT_HPARAMS


def prepare_baseline_store(work: Path, tokenizer: str = TOKENIZER,
                           vocab_size: int = VOCAB_SIZE) -> TokenStore:
    """The baselines' store of train.txt: the tokenizer and split ``chimera evolve`` makes."""
    spec = CorpusSpec(str(work / TRAIN_FILE), separator=Separator.END_OF_TEXT)
    out = work / STORE_DIR
    return prepare_store(spec, tokenizer_for(spec, tokenizer, vocab_size, out), out,
                         SplitConfig(), tokenizer_recipe=tokenizer_recipe(tokenizer,
                                                                          vocab_size))[0]


def run_baseline(job: Job, work: Path, launched: float, deadline: float) -> dict:
    store = TokenStore.open(work / STORE_DIR)
    torch.manual_seed(job.seed)
    model, hparams = baseline(job.name, store.vocab_size)
    # The presets train as Chimera's pretraining does (its plateau decay); nanoGPT as its recipe.
    patience = PLATEAU_PATIENCE if job.name in PRESETS else 0
    trained = train_for_seconds(model, hparams, store, deadline, seed=job.seed,
                                plateau_patience=patience)
    wall = time.time() - launched
    scored = score_model(model, store.load_tokenizer(), held_out_documents(work), hparams.seq_len)
    return {**scored, "wall_seconds": wall, "tokens_per_second": trained.tokens_per_second,
            "train_tokens": trained.tokens, "steps": trained.steps, "best_step": trained.best_step,
            "plateau_patience": patience, "decay_step": trained.decay_step,
            "val_history": [(step, store.bits_per_byte(loss))
                            for step, loss in trained.val_history],
            "val_bpb": store.bits_per_byte(trained.best_val_loss), "diverged": trained.diverged,
            "params": sum(p.numel() for p in model.parameters()),
            "tokenizer_fingerprint": store.meta["tokenizer_fingerprint"]}


# ----------------------------------------------------------------------------- chimera
def evolve_command(train_file: Path, run_dir: Path, seconds: float, seed: int) -> list[str]:
    """``chimera evolve`` on train.txt with the baselines' tokenizer settings; its default data
    seed draws the same validation documents as their store."""
    return [sys.executable, "-m", "cluster.cli", "evolve", "--corpus", str(train_file),
            "--separator", Separator.END_OF_TEXT.value, "--tokenizer", TOKENIZER,
            "--vocab-size", str(VOCAB_SIZE), "--budget", f"{max(1, round(seconds))}s",
            "--run-dir", str(run_dir), "--seed", str(seed), "--no-live"]


def promote_command(run_dir: Path, out: Path, seed: int, sizing: list[str]) -> list[str]:
    return [sys.executable, "-m", "cluster.cli", "promote", str(run_dir), "--out", str(out),
            "--seed", str(seed), *sizing]


def run_chimera(job: Job, work: Path, launched: float, deadline: float, bench: dict) -> dict:
    scratch = work / "runs" / job.stem
    shutil.rmtree(scratch, ignore_errors=True)  # an unfinished attempt: its time is lost
    run_dir, out = scratch / "run", scratch / "promoted"
    identity = bench["identity"]
    began = time.time()
    evolve = evolve_command(work / TRAIN_FILE, run_dir, identity["evolve_share"]
                            * identity["budget_seconds"], job.seed)
    # A smoke run's search has seconds: candidates small enough to finish in them.
    _run_stage(evolve + QUICK_EVOLVE_FLAGS * identity["quick"]
               + shlex.split(identity.get("evolve_args") or ""), "chimera evolve")
    evolve_seconds = time.time() - began
    left = deadline - time.time()
    if left < MIN_PROMOTE_SECONDS:
        warnings.warn(f"evolve left {left:.0f}s; promote gets {MIN_PROMOTE_SECONDS}s and the "
                      f"method overruns its budget", stacklevel=2)
    sizing = ["--budget", f"{max(1, round(max(left, MIN_PROMOTE_SECONDS)))}s"]
    _run_stage(promote_command(run_dir, out, job.seed, sizing), "chimera promote")
    wall = time.time() - launched
    return {**score_promoted(out, held_out_documents(work)), "wall_seconds": wall,
            "stage_seconds": _stage_seconds(out, evolve_seconds, wall),
            "promote_sizing": sizing}


def _run_stage(command: list[str], what: str) -> None:
    code = subprocess.run(command, cwd=REPO).returncode
    if code:  # the command has said why; one line here, not a traceback
        raise SystemExit(f"{what} failed (exit {code}): {shlex.join(command)}")


def score_promoted(out: Path, documents: list[str]) -> dict:
    """The promoted base model's score (and the chat model's), in the base's training context."""
    from cluster.app.promote import BASE_DIR
    from cluster.app.promote.finalists import FINALISTS_DIR

    metrics = json.loads((out / "metrics.json").read_text())
    context = metrics["hparams"]["seq_len"]
    base, tokenizer = load_pretrained(out / BASE_DIR)
    # The base model's own pretraining seconds: with finalists, its share of the stage's.
    seconds = next((f["seconds"] for f in metrics.get("finalists", [])
                    if f["candidate_id"] == metrics["candidate_id"] and "seconds" in f),
                   metrics["seconds"]["pretrain"])
    result = {**score_model(base, tokenizer, documents, context),
              "params": metrics["params"], "genome_summary": metrics["genome_summary"],
              "tokens_per_second": metrics["pretrain"]["tokens"] / max(seconds, 1e-9),
              "train_tokens": metrics["pretrain"]["tokens"],
              "val_bpb": metrics["pretrain"]["val_bpb"]}
    # The finalists pretraining ranked on its validation split, scored on the held-out
    # documents too: did its ranking pick the one that is best there? (The chosen one is the
    # base model; the others are in finalists/.)
    result["finalists"] = []
    for finalist in metrics.get("finalists", []):
        where = out / FINALISTS_DIR / f"candidate-{finalist['candidate_id']}"
        bpb = score_model(load_model(where).eval(), tokenizer, documents, context)["bpb"] \
            if where.is_dir() else result["bpb"]
        result["finalists"].append({**finalist, "bpb": bpb})
    if (out / "config.json").is_file():
        chat, chat_tokenizer = load_pretrained(out)
        result["chat_bpb"] = score_model(chat, chat_tokenizer, documents, context)["bpb"]
    return result


def _stage_seconds(out: Path, evolve_seconds: float, wall: float) -> dict:
    stages = {"evolve": evolve_seconds,
              **json.loads((out / "metrics.json").read_text())["seconds"]}
    stages["other"] = max(0.0, wall - sum(stages.values()))  # start-ups, Ray, the CLI
    return stages


def run_job(argv: list[str]) -> None:
    """The child: one job, its result written atomically to WORK/results/."""
    parser = argparse.ArgumentParser(prog=f"end_to_end.py {JOB_FLAG}")
    for name, kind in (("name", str), ("seed", int), ("work", Path), ("launched", float)):
        parser.add_argument(name, type=kind)
    args = parser.parse_args(argv)
    bench = json.loads((args.work / BENCH_FILE).read_text())
    deadline = args.launched + bench["identity"]["budget_seconds"]
    method = next(j.method for j in jobs_for(list(METHODS), [args.seed]) if j.name == args.name)
    job = Job(args.name, method, args.seed)
    if job.name == "chimera":
        result = run_chimera(job, args.work, args.launched, deadline, bench)
    else:
        result = run_baseline(job, args.work, args.launched, deadline)
    result.update(job=job.name, method=job.method, seed=job.seed)
    path = _result_path(args.work, job)
    path.parent.mkdir(exist_ok=True)
    _write_json(path, result)
    print(f"{job.stem}: {result['bpb']:.4f} bpb held out, {result['wall_seconds']:.0f}s",
          flush=True)


# ----------------------------------------------------------------------------- report
COLUMNS = ("method", "seeds", "held-out bpb", "/ nanogpt", "/ sweep best", "wall", "tokens/s",
           "params", "notes")


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _notes(results: list[dict]) -> str:
    first = results[0]
    if "stage_seconds" not in first:
        return f"best step {first['best_step']}/{first['steps']}" + \
            (f", decay from {first['decay_step']}" if first.get("decay_step") else "") + \
            (", diverged" if first["diverged"] else "")
    totals = {stage: statistics.mean(r["stage_seconds"][stage] / r["wall_seconds"]
                                     for r in results) for stage in first["stage_seconds"]}
    shares = " ".join(f"{stage} {share:.0%}" for stage, share in totals.items())
    chat = [r["chat_bpb"] for r in results if "chat_bpb" in r]
    return (f"{shares}; winner {' / '.join(r['genome_summary'] for r in results)}"
            + (f"; chat {statistics.mean(chat):.4f} bpb" if chat else ""))


def table_rows(results: list[dict]) -> list[list[str]]:
    """One row per method (seeds pooled), the sweep's members below its best."""
    by_method: dict[str, list[dict]] = {}
    for result in results:
        by_method.setdefault(result["method"], []).append(result)
    nanogpt = statistics.mean(r["bpb"] for r in by_method.get("nanogpt", [])) \
        if "nanogpt" in by_method else None
    members = by_method.pop("nanogpt-sweep", [])
    seed = members[0]["seed"] if members else None
    members += [r for r in by_method.get("nanogpt", []) if r["seed"] == seed]
    best = min(members, key=lambda r: r["bpb"]) if members else None
    groups = [(m, rs) for m, rs in by_method.items()]
    if best is not None:
        groups.append((f"nanogpt-sweep (best: {best['job']})", [best]))
        groups += [(f"  {r['job']}", [r]) for r in sorted(members, key=lambda r: r["bpb"])]
    rows = []
    for label, group in groups:
        bpb = statistics.mean(r["bpb"] for r in group)
        rows.append([label, str(len(group)), _mean_spread([r["bpb"] for r in group]),
                     f"{bpb / nanogpt:.3f}" if nanogpt else "-",
                     f"{bpb / best['bpb']:.3f}" if best else "-",
                     f"{statistics.mean(r['wall_seconds'] for r in group) / 60:.1f} min",
                     f"{statistics.mean(r['tokens_per_second'] for r in group):,.0f}",
                     f"{group[0]['params'] / 1e6:.2f}M", _notes(group)])
    return rows


def report(rows: list[list[str]], bench: dict, work: Path, command: str, console: Console
           ) -> None:
    identity = bench["identity"]
    facts = (f"corpus {identity['corpus']} ({identity['separator']}-separated"
             f"{', quick' if identity['quick'] else ''}): {bench['train_documents']:,} training "
             f"documents ({bench['train_bytes']:,} bytes), {bench['held_out_documents']} held out "
             f"({bench['held_out_bytes']:,} bytes); {identity['budget_seconds']:.0f}s per method")
    table = Table(*COLUMNS, title="held-out bits per byte at equal wall clock")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(facts, highlight=False)
    lines = ["# End-to-end bench", "", f"    {command}", "", facts, "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    (work / "summary.md").write_text("\n".join(lines) + "\n")
    console.print(f"written: {work / 'summary.md'}", highlight=False)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    from cluster.cli.argtypes import parse_duration  # the CLI's import is heavy: parent only

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, help="a corpus file (or folder)")
    parser.add_argument("--budget", type=parse_duration, default=None,
                        help="wall clock per method, e.g. 30m (default 30m; --quick: 40s)")
    parser.add_argument("--val", default=None, help="held-out documents from this file instead")
    parser.add_argument("--separator", choices=["auto", *(s.value for s in Separator)],
                        default="auto", help="auto: eot if the file has <|endoftext|> lines")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "end-to-end")
    parser.add_argument("--evolve-share", type=float, default=0.35,
                        help="chimera: the share of the budget its search gets")
    parser.add_argument("--split-seed", type=int, default=0, help="which documents are held out")
    parser.add_argument("--evolve-args", default=None, metavar="FLAGS",
                        help="chimera: more flags for chimera evolve (an experiment; part of "
                             "the WORK's identity), e.g. '--candidate-tokens 100000'")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_BUDGET} per method, the first "
                             f"{QUICK_CORPUS_BYTES // 1000} KB of the corpus")
    args = parser.parse_args(argv)
    args.budget = args.budget or parse_duration(QUICK_BUDGET if args.quick else "30m")
    return args


def main() -> None:
    if sys.argv[1:2] == [JOB_FLAG]:
        run_job(sys.argv[2:])
        return
    # Piped or logged, the table keeps its columns (rich would wrap it at 80).
    args, console = parse_args(sys.argv[1:]), Console(width=None if sys.stdout.isatty() else 180)
    work = args.work.resolve()
    bench = prepare_bench(args, work)
    jobs = jobs_for(args.methods, args.seeds)
    run_pending([job for job in jobs if not _result_path(work, job).is_file()], work, args.budget,
                console)
    results = [json.loads(_result_path(work, job).read_text()) for job in jobs
               if _result_path(work, job).is_file()]
    if results:
        report(table_rows(results), bench, work,
               shlex.join(["python", "bench/end_to_end.py", *sys.argv[1:]]), console)


def _result_path(work: Path, job: Job) -> Path:
    return work / "results" / f"{job.stem}.json"


def run_pending(pending: list[Job], work: Path, budget: float, console: Console) -> None:
    """Each job in a fresh child process, one after another; a failed one is reported and left
    for a rerun."""
    if any(job.name != "chimera" for job in pending):
        began = time.time()
        store = prepare_baseline_store(work)
        console.print(f"baselines' store: {store.info('train').tokens:,} training tokens "
                      f"({time.time() - began:.0f}s, outside the budgets)", highlight=False)
    for job in pending:
        console.rule(f"{job.stem} ({budget:.0f}s)")
        command = [sys.executable, str(Path(__file__).resolve()), JOB_FLAG, job.name,
                   str(job.seed), str(work), repr(time.time())]
        code = subprocess.run(command, cwd=REPO).returncode
        if code:
            console.print(f"[red]{job.stem} failed (exit {code}); run again to retry[/red]")


if __name__ == "__main__":
    main()
