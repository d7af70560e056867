"""Standard evaluation with EleutherAI's lm-evaluation-harness: Chimera's held-out tasks written
as ordinary harness tasks (YAML + JSONL, ``write_tasks``), and a runner (``run_harness``).

    chimera_qa           the held-out reading questions ``chimera promote`` asks, as multiple
                         choice: the taught reply and up to three naming wrong answers (acc,
                         acc_norm)
    chimera_preference   the taught reply against the one ``trainers.preferences`` made wrong
    chimera_heldout_ppl  held-out documents, rolling log-likelihood (word/byte perplexity, bpb)

From stories generated apart from the training ones, or a user's run's validation split. The
model loads through ``AutoModelForCausalLM`` (``chimera.hf``), as the harness's own command line
loads it from the same folder, so anyone with the harness gets the same scores.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml
from transformers import AutoModelForCausalLM

from chimera.checkpoint import (
    CONFIG_FILE,
    HF_MODEL_TYPE,
    WEIGHTS_FILE,
    CheckpointError,
    atomic_write,
    load_config,
)
from chimera.inference import TOKENIZER_DIR
from chimera.tokenizer import CHAT_TEMPLATE, TokenizerError, load_tokenizer
from trainers.answers import names_answer
from trainers.instructions import HELDOUT_SEED_OFFSET
from trainers.preferences import document_preferences, story_preferences, substituted
from trainers.stories import generate_story

QA, PREFERENCE, PPL = "chimera_qa", "chimera_preference", "chimera_heldout_ppl"
OUR_TASKS = DEFAULT_TASKS = (QA, PREFERENCE, PPL)
QUESTIONS, TEXTS = 200, 100
CHOICES = 4  # of chimera_qa: the right reply and up to three wrong ones
TEXT_FIRST_STORY = 300_000  # held-out stories for perplexity: apart from qa_items's 100_000+
TEXT_SHARE = 0.9  # of a window a held-out passage may fill, so most score in one window
PROMOTE_STATE, BASE_DIR = "promote-state.json", "base"  # cluster.app.promote's (not imported:
# it pulls in Ray and the trainers, which the built-in stories do not need)
RESULTS_FILE, TABLE_FILE, TASK_DIR = "lm_eval.json", "lm_eval.md", "tasks"


class HarnessError(ValueError):
    """Bad input for an evaluation: a task that does not exist, a run that is not one."""


# ----------------------------------------------------------------------------- held-out data
@dataclass(frozen=True)
class HeldOut:
    """Where the tasks' items come from: each ``draw(n, seed)`` gives up to ``n``; ``pairs``:
    the held-out questions as preference records with "expected" and "others"."""

    source: str
    pairs: Callable[[int, int], list[dict]]
    texts: Callable[[int, int], list[str]]


def story_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` held-out stories: seeded apart from the corpus's and the fine-tuning's, and
    indexed apart from the held-out questions' stories."""
    return [generate_story(seed + HELDOUT_SEED_OFFSET, TEXT_FIRST_STORY + i).text
            for i in range(n)]


def stories_heldout() -> HeldOut:
    return HeldOut("generated stories", lambda n, seed: story_preferences(
        n, seed, heldout=True, with_answers=True), story_texts)


def store_heldout(run_dir: Path, max_seq_len: int) -> HeldOut:
    """Questions and texts from the run's validation documents, cut into passages as
    promote cuts them (``cluster.app.promote.instruction_data``)."""
    from cluster.app.promote.instruction_data import passage_chars
    from cluster.app.rundir import STORE_DIR
    from trainers.doc_instructions import StoreDocuments, passages
    from trainers.sft import QA_NEW_TOKENS
    from trainers.store import TokenStore

    store = TokenStore.open(run_dir / STORE_DIR, verify=False)
    documents = StoreDocuments(store, "val", store.load_tokenizer())
    room = passage_chars(store, max_seq_len - QA_NEW_TOKENS)
    text_chars = max(1, int((max_seq_len - 1) * TEXT_SHARE * store.info("val").bytes_per_token))

    def texts(n: int, seed: int) -> list[str]:
        order = random.Random(f"chimera-eval-texts:{seed}").sample(range(len(documents)),
                                                                   len(documents))
        found: list[str] = []
        for index in order:
            found += passages(documents[index], text_chars)[:n - len(found)]
            if len(found) >= n:
                break
        return found

    return HeldOut(f"the validation split of {run_dir}", lambda n, seed: document_preferences(
        documents, n, seed, room, with_answers=True), texts)


def run_of(model_dir: Path) -> Path | None:
    """The run a promoted model (or its ``base/``) was made from, if it is still there."""
    promoted = model_dir.parent if model_dir.name == BASE_DIR else model_dir
    try:
        run = Path(json.loads((promoted / PROMOTE_STATE).read_text(encoding="utf-8"))["run"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a promoted model (or its record is unreadable)
    return run if (run / "run.json").is_file() else None


def heldout_for(model_dir: Path, run: str | Path | None, max_seq_len: int) -> HeldOut:
    """The built-in stories, unless the run (``run``, else the one a promoted model names)
    searched on a user's corpus."""
    run_dir = Path(run) if run is not None else run_of(model_dir)
    if run_dir is None:
        return stories_heldout()
    from cluster.app.evolve import load_settings
    from cluster.app.promote.instruction_data import from_stories

    try:
        settings = load_settings(run_dir)
    except FileNotFoundError as err:
        raise HarnessError(str(err)) from None
    return stories_heldout() if from_stories(settings) else store_heldout(run_dir, max_seq_len)


# ----------------------------------------------------------------------------- task records
def chat_prompt(tokenizer, messages: Sequence[dict]) -> str:
    """The messages as the model sees them before it replies; Chimera's template for a base
    tokenizer that has none."""
    template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    return tokenizer.apply_chat_template(list(messages), chat_template=template,
                                         tokenize=False, add_generation_prompt=True)


def question_kind(prompt: Sequence[dict]) -> str:
    """The question with its names and quotes masked: "Who is X friend?", so a wrong answer
    can be borrowed from another question of the same kind."""
    asked = prompt[-1]["content"].rstrip().rsplit("Question:", 1)[-1].strip()
    asked = re.sub(r'"[^"]*"', '"…"', asked)
    return re.sub(r"(?<=\s)[A-Z][\w'’-]*", "X", asked)


def _choice_record(context: str, right: str, wrong: Sequence[str], rng: random.Random,
                   **extra) -> dict:
    choices = [right, *wrong]
    rng.shuffle(choices)  # the right one anywhere: np.argmax breaks ties towards the first
    return {"context": context, "choices": choices, "gold": choices.index(right), **extra}


def qa_records(pairs: Sequence[dict], tokenizer, seed: int) -> list[dict]:
    """Multiple choice among replies: the taught one, the pair's rejected one, then the taught
    one naming other wrong candidates: the document's own first, then right answers to other
    questions of the same kind that the document does not contain."""
    pools: dict[str, dict[str, None]] = {}
    for pair in pairs:
        pools.setdefault(question_kind(pair["prompt"]), {})[pair["expected"]] = None
    rng = random.Random(f"chimera-eval-qa:{seed}")
    records = []
    for pair in pairs:
        reply, right = pair["chosen"][-1]["content"], pair["expected"]
        document = pair["prompt"][-1]["content"].casefold()
        pool = [c for c in pools[question_kind(pair["prompt"])] if c.casefold() not in document]
        wrong = [pair["rejected"][-1]["content"]]
        for candidate in [*pair["others"], *rng.sample(pool, len(pool))]:
            if len(wrong) == CHOICES - 1:
                break
            named = substituted(reply, right, candidate)
            # Not the right answer again in other words ("Lily" for "lily", "Anne" of "Lady
            # Anne"), nor a reply already among the choices.
            if named and named not in (reply, *wrong) and not names_answer(named, right):
                wrong.append(named)
        records.append(_choice_record(chat_prompt(tokenizer, pair["prompt"]), reply, wrong,
                                      rng, expected=right))
    return records


def preference_records(pairs: Sequence[dict], tokenizer, seed: int) -> list[dict]:
    rng = random.Random(f"chimera-eval-preference:{seed}")
    return [_choice_record(chat_prompt(tokenizer, pair["prompt"]),
                           pair["chosen"][-1]["content"], [pair["rejected"][-1]["content"]],
                           rng) for pair in pairs]


# ----------------------------------------------------------------------------- task files
def _metric(name: str, higher_is_better: bool, aggregation: str = "mean") -> dict:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


def task_config(name: str, data_file: Path, source: str) -> dict:
    """The harness's YAML for one task; the data by absolute path (``datasets`` resolves a
    relative one against the working directory, not the YAML's)."""
    config = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
              "test_split": "test"}
    if name == PPL:
        config.update(output_type="loglikelihood_rolling", doc_to_text="",
                      doc_to_target="text",
                      metric_list=[_metric("word_perplexity", False, "weighted_perplexity"),
                                   _metric("byte_perplexity", False, "weighted_perplexity"),
                                   _metric("bits_per_byte", False, "bits_per_byte")])
    else:
        # The context ends with the template's "<|assistant|>\n", the reply follows as is (the
        # harness moves that "\n" into each continuation: one more term, the same for all).
        config.update(output_type="multiple_choice", doc_to_text="context",
                      doc_to_choice="choices", doc_to_target="gold", target_delimiter="",
                      metric_list=[_metric("acc", True), _metric("acc_norm", True)])
    config["metadata"] = {"version": 1.0, "source": source}
    return config


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _records(name: str, heldout: HeldOut, pairs: Callable[[], list[dict]], tokenizer,
             texts: int, seed: int) -> list[dict]:
    if name == QA:
        return qa_records(pairs(), tokenizer, seed)
    if name == PREFERENCE:
        return preference_records(pairs(), tokenizer, seed)
    return [{"text": text} for text in heldout.texts(texts, seed)]


def write_tasks(model_dir: str | Path, out_dir: str | Path, run: str | Path | None = None,
                questions: int = QUESTIONS, texts: int = TEXTS, seed: int = 0,
                tasks: Sequence[str] = OUR_TASKS) -> dict:
    """Write ``tasks`` (of ``OUR_TASKS``) into ``out_dir`` as YAML + JSONL that the harness
    loads with ``--include_path out_dir``, prompts templated with ``model_dir``'s tokenizer.
    ``run``: the run whose validation documents to use (default: the built-in stories, or the
    run a promoted model names). Returns what was written: {"source", "tasks": {name: items}}."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    unknown = [t for t in tasks if t not in OUR_TASKS]
    if unknown:
        raise HarnessError(f"unknown task {unknown[0]!r}: Chimera's tasks are "
                           f"{', '.join(OUR_TASKS)}")
    config, tokenizer = check_model_dir(model_dir)
    heldout = heldout_for(model_dir, run, config.max_seq_len)
    pairs = functools.cache(lambda: heldout.pairs(questions, seed))  # both choice tasks'
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in tasks:
        records = _records(name, heldout, pairs, tokenizer, texts, seed)
        if not records:
            raise HarnessError(f"{name}: {heldout.source} gave no items")
        data_file = out_dir / f"{name}.jsonl"
        _write_text(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                       for r in records))
        _write_text(out_dir / f"{name}.yaml", yaml.safe_dump(
            task_config(name, data_file, heldout.source), sort_keys=False, allow_unicode=True))
        written[name] = len(records)
    drawn = f"--questions {questions} --texts {texts} --seed {seed}" + \
        (f" --run {run}" if run is not None else "")
    _write_text(out_dir / "README.md", _readme(model_dir, out_dir, list(written), config,
                                               heldout.source, drawn))
    return {"source": heldout.source, "tasks": written, "dir": str(out_dir)}


def check_model_dir(model_dir: Path):
    """The model's config and tokenizer; CheckpointError / TokenizerError for a directory
    that is not a model (one line each)."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such model directory")
    config = load_config(model_dir)
    if not (model_dir / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{model_dir / WEIGHTS_FILE}: no such file")
    tokenizer = load_tokenizer(model_dir / TOKENIZER_DIR)
    if len(tokenizer) != config.vocab_size:
        raise TokenizerError(f"{model_dir / TOKENIZER_DIR}: {len(tokenizer)} tokens, but the "
                             f"model's vocabulary has {config.vocab_size}")
    return config, tokenizer


def names_its_type(model_dir: Path) -> bool:
    """Whether config.json names Chimera's ``model_type``, which the Auto classes need."""
    return json.loads((model_dir / CONFIG_FILE).read_text()).get("model_type") == HF_MODEL_TYPE


def harness_command(model_dir: Path, task_dir: Path, tasks: Sequence[str], max_length: int,
                    batch_size: int = 8, device: str = "cpu") -> str:
    """The harness's own command line for these tasks. ``python -c``: Chimera's classes must
    be registered (``import chimera``) before the harness asks AutoConfig; ``max_length``: the
    harness finds no context length in Chimera's config and would assume 2048."""
    model = Path(model_dir).resolve()
    return (f"python -c 'import sys, chimera; from lm_eval.__main__ import cli_evaluate; "
            f"sys.exit(cli_evaluate())' --model hf --model_args "
            f"pretrained={model},tokenizer={model / TOKENIZER_DIR},max_length={max_length},"
            f"backend=causal --include_path {Path(task_dir).resolve()} --tasks "
            f"{','.join(tasks)} --batch_size {batch_size} --device {device}")


def _readme(model_dir: Path, out_dir: Path, tasks: list[str], config, source: str,
            drawn: str) -> str:
    unnamed = "" if names_its_type(model_dir) else (
        f"\n`{model_dir}/config.json` names no `model_type` (written before Chimera's "
        f"transformers classes): `chimera eval` reads it, the harness's own command needs it "
        f"saved again first (`chimera.checkpoint.save_model(load_model(DIR), DIR)`).\n")
    return (f"# Chimera evaluation tasks for lm-evaluation-harness\n\n"
            f"Made from {source} ({drawn}), prompts templated with the tokenizer of "
            f"`{model_dir}`. Tasks: {', '.join(tasks)}. The data files are named by absolute "
            f"path in the YAML files: after moving this folder, write it again "
            f"(`chimera eval`) or edit `data_files`.\n\n"
            f"With Chimera installed:\n\n    chimera eval {model_dir} --tasks "
            f"{','.join(tasks)} {drawn}\n\nWith the harness's command line:\n\n    "
            f"{harness_command(model_dir, out_dir, tasks, config.max_seq_len)}\n{unnamed}")


# ----------------------------------------------------------------------------- running
def run_harness(model_dir: str | Path, tasks: Sequence[str], task_dir: str | Path,
                limit: int | None = None, batch_size: int = 8, device: str = "cpu",
                out_dir: str | Path | None = None, log_samples: bool = False) -> dict:
    """Score the model in ``model_dir`` on ``tasks`` (ours in ``task_dir``, or any the harness
    knows) with ``lm_eval.simple_evaluate``; writes ``lm_eval.json`` and ``lm_eval.md`` into
    ``out_dir`` (default: ``task_dir``'s parent) and returns the harness's results (with each
    document's scores under "samples" when ``log_samples``)."""
    try:  # an optional dependency: the tasks are written without it
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise HarnessError("lm-evaluation-harness is not installed: pip install "
                           "'chimera-search[eval]'") from None

    model_dir, task_dir = Path(model_dir), Path(task_dir)
    out_dir = Path(out_dir) if out_dir is not None else task_dir.parent
    config, tokenizer = check_model_dir(model_dir)
    # The harness's own task folders only when a standard task is named: indexing them all
    # takes seconds, and ours need none. Ours read local JSONL through datasets' packaged
    # "json" builder, which asks no hub: nothing is downloaded (the tests block the network).
    ours = all(t in OUR_TASKS for t in tasks)
    manager = TaskManager(include_path=str(task_dir) if task_dir.is_dir() else None,
                          include_defaults=not ours)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise HarnessError(f"unknown task {missing[0]!r}: not in {task_dir} nor among the "
                           f"harness's tasks")
    model = load_hf_model(model_dir).to(device).eval()
    # max_length: Chimera's config names no context length the harness looks for (it would
    # assume 2048, past the model's window, which it refuses).
    lm = HFLM(pretrained=model, backend="causal", tokenizer=tokenizer, batch_size=batch_size,
              max_length=config.max_seq_len)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                      task_manager=manager, log_samples=log_samples)
    write_results(results, out_dir, model_dir)
    return results


def load_hf_model(model_dir: Path):
    """The transformers model, as ``--model hf`` loads it; a directory whose config.json names
    no ``model_type`` (older ones) by the class the Auto classes would pick."""
    from chimera.hf import ChimeraForCausalLM  # here: PreTrainedModel is a slow import

    loader = AutoModelForCausalLM if names_its_type(model_dir) else ChimeraForCausalLM
    return loader.from_pretrained(model_dir)


def result_rows(results: dict) -> list[tuple[str, str, float, float | None, int | None]]:
    """(task, metric, value, standard error or None, documents) for each metric reported."""
    rows = []
    for task, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric in ("alias", "sample_len") or metric.endswith("_stderr") \
                    or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            rows.append((task, metric, float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None, n))
    return rows


def markdown_table(results: dict, model_dir: Path) -> str:
    lines = [f"lm-evaluation-harness {version('lm_eval')} on `{model_dir}`", "",
             "| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for task, metric, value, stderr, n in result_rows(results):
        lines.append(f"| {task} | {metric} | {value:.4f} | "
                     f"{'' if stderr is None else f'{stderr:.4f}'} | {n or ''} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: Path, model_dir: Path) -> None:
    """``lm_eval.json`` (the harness's results, less the per-document samples) and
    ``lm_eval.md``, each replaced whole."""
    from lm_eval.utils import handle_non_serializable

    out_dir.mkdir(parents=True, exist_ok=True)
    kept = {k: v for k, v in results.items() if k != "samples"}
    _write_text(out_dir / RESULTS_FILE, json.dumps(kept, indent=2, default=handle_non_serializable,
                                                   ensure_ascii=False) + "\n")
    _write_text(out_dir / TABLE_FILE, markdown_table(results, model_dir))
