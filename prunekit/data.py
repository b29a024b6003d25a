"""Calibration and evaluation corpora, and the DataModule that serves them as token windows.

Corpora are registered by name (``register_corpus``; third parties may also use the entry-point group
``prunekit.corpora``). A corpus returns documents for a split, ``"calibration"`` or ``"evaluation"``; the two
splits never share a document.

``wiki``: the English Wikipedia article dump that ships in gensim's wheel (test data
``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, 206 pages). Articles are extracted
with gensim's ``extract_pages`` + ``filter_wiki`` (markup removed), redirects and pages under 500 characters
are dropped, and an article goes to the evaluation split when ``crc32(title) % 5 == 0`` (about 20%),
otherwise to calibration. The rule depends on the title only, so it is stable across machines and versions.
Of the dump's 206 pages, 105 articles are kept: 90 calibration (629 k SmolLM2 tokens), 15 evaluation (90.5 k).

``text``: local ``.txt`` files (one document per file) or ``.jsonl`` files (one document per line, field
``text_field``), read with Hugging Face ``datasets``.

``task``: the examples of packaged lm-eval tasks (``corpus_options: {tasks: [piqa, arc_easy]}``, groups such as
``seap7`` allowed), each rendered by lm-eval with its gold answer (``prunekit.tasks.prompts``); the
calibration split is the tasks' calibration reserve, the evaluation split what lm-eval scores. Each task is
a *source*; ``general: wiki`` adds a text corpus as one more source (SEAP-gen's general data).

Sources: a corpus function may return ``{source: documents}``. With ``packing=documents`` every sequence
keeps the index of its source (``calibration_sources`` / ``calibration_labels``; the batch carries it), so a
strategy can keep statistics per source in one pass; ``num_samples`` then counts documents per source.

Documents are strings, or ``(context, continuation)`` pairs (the ``task`` corpus' answered examples: the
prompt and its gold answer). A pair is read as one text; with ``packing=documents`` its batch also carries a
``loss_mask`` marking the continuation's tokens, so the gradient pipeline takes its loss on the answer only.

Batches are dicts: ``input_ids`` (B, T), ``index`` (B,) global example indices, ``source`` (B,) source
indices (``-1`` without sources) and ``loss_mask`` (B, T) — what ``prunekit.observe.as_batch`` reads.

Packing of the calibration split (``packing``):

- ``windows`` (default): documents are joined with blank lines and tokenized once; ``contiguous`` takes the
  first ``num_samples`` non-overlapping windows of ``seq_len`` tokens, ``random`` takes ``num_samples``
  distinct non-overlapping window slots chosen with ``seed`` (the Wanda/SparseGPT references draw random
  offsets from random C4 documents, possibly overlapping; we keep windows disjoint so no token is counted
  twice).
- ``documents``: every document is its own sequence (its first ``seq_len`` tokens), as task-specific methods
  (SEAP) feed one prompt per forward pass; ``num_samples`` documents (0 = all), the first ones or a seeded
  random choice. Sequences differ in length, so ``batch_size`` must be 1 (no padding enters the statistics).
  A source with fewer than ``num_samples`` documents is an error, unless ``allow_fewer`` (then it gives all
  it has, and ``describe_calibration`` names the count per source): SEAP's 200 prompts per task exceed the
  reserved calibration sets of WinoGrande (124) and PIQA (170).

Evaluation text is always packed in windows.
"""

from __future__ import annotations

import bz2
import re
import zlib
from collections.abc import Callable
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from prunekit.errors import PrunekitError

Split = Literal["calibration", "evaluation"]
CorpusFn = Callable[..., list[str]]
_CORPORA: dict[str, CorpusFn] = {}

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_CHARS = 500
WIKI_EVAL_MODULUS = 5
GENERAL_MIN_CHARS = 200  # paragraphs of a general corpus used as one source of the task corpus


def register_corpus(name: str) -> Callable[[CorpusFn], CorpusFn]:
    """Register ``fn(split, **options) -> list[str]`` under ``name``."""

    def wrap(fn: CorpusFn) -> CorpusFn:
        _CORPORA[name] = fn
        return fn

    return wrap


def corpora() -> dict[str, CorpusFn]:
    for ep in entry_points(group="prunekit.corpora"):
        _CORPORA.setdefault(ep.name, ep.load())
    return dict(_CORPORA)


def sourced_documents(corpus: str, split: Split, **options) -> dict[str, list[str]]:
    """The corpus' documents by source: a corpus function may return ``{source: documents}`` (the ``task``
    corpus: one source per task) or a plain list (one source named after the corpus)."""
    available = corpora()
    if corpus not in available:
        raise PrunekitError(f"unknown corpus {corpus!r}; available corpora: {', '.join(sorted(available))}")
    raw = available[corpus](split, **options)
    groups = raw if isinstance(raw, dict) else {corpus: raw}
    out = {name: [d for d in docs if text_of(d).strip()] for name, docs in groups.items()}
    empty = [name for name, docs in out.items() if not docs]
    if not out or empty:
        where = f" (source {', '.join(empty)})" if len(out) > 1 else ""
        raise PrunekitError(f"corpus {corpus!r} has no documents in its {split} split{where}")
    return out


def text_of(document: str | tuple[str, str]) -> str:
    """A document's text: a string, or a (context, continuation) pair joined."""
    return document if isinstance(document, str) else document[0] + document[1]


def documents(corpus: str, split: Split, **options) -> list[str]:
    """Every document of a corpus split, sources one after another."""
    return [d for docs in sourced_documents(corpus, split, **options).values() for d in docs]


def _clean_wiki(text: str) -> str:
    text = re.sub(r"'{2,}", "", text)  # bold/italic quotes left by filter_wiki
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, text) of every kept article of the dump, in dump order."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    path = Path(datapath(WIKI_DUMP))
    if not path.is_file():
        raise PrunekitError(f"the Wikipedia dump {path} is missing: reinstall gensim (pip install gensim==4.4.0)")
    articles = []
    with bz2.BZ2File(path) as fh:
        for title, raw, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = _clean_wiki(filter_wiki(raw))
            if len(text) >= WIKI_MIN_CHARS:
                articles.append((title, text))
    return tuple(articles)


def wiki_split_of(title: str) -> Split:
    return "evaluation" if zlib.crc32(title.encode("utf-8")) % WIKI_EVAL_MODULUS == 0 else "calibration"


@register_corpus("wiki")
def wiki(split: Split) -> list[str]:
    return [text for title, text in wiki_articles() if wiki_split_of(title) == split]


@register_corpus("text")
def text_files(split: Split, paths: list[str] | None = None, text_field: str = "text") -> list[str]:
    """Local files; ``paths`` are the files of the requested split."""
    if not paths:
        raise PrunekitError(f"corpus 'text' needs file paths for its {split} split (--data.paths / --data.eval_paths)")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise PrunekitError(f"text corpus files not found: {missing}")
    for path in paths:  # a binary file would fail deep inside datasets with a decoding traceback
        try:
            with open(path, encoding="utf-8") as fh:
                while fh.read(1 << 20):
                    pass
        except UnicodeDecodeError as e:
            raise PrunekitError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); the text corpus reads "
                                ".txt files and .jsonl files of UTF-8 text") from None
    import datasets

    kinds = {Path(p).suffix for p in paths}
    if kinds <= {".txt"}:
        ds = datasets.load_dataset("text", data_files=list(paths), sample_by="document", split="train")
        return list(ds["text"])
    if kinds <= {".jsonl", ".json"}:
        ds = datasets.load_dataset("json", data_files=list(paths), split="train")
        if text_field not in ds.column_names:
            raise PrunekitError(f"{paths}: no field {text_field!r}; fields are {ds.column_names} (set --data.text_field)")
        return [str(t) for t in ds[text_field]]
    raise PrunekitError(f"text corpus files must all be .txt or all .jsonl, got {sorted(kinds)}")


@register_corpus("task")
def task_examples(split: Split, tasks: list[str] | str | None = None, answered: bool = True,
                  general: str | None = None) -> dict[str, list[str]]:
    """Examples of lm-eval tasks as the model reads them (``answered``: (prompt, gold answer) pairs), one
    source per task (an lm-eval group such as ``mmlu`` is one source of all its subjects); ``general`` adds a
    registered text corpus (e.g. ``wiki``) as one more source, split into paragraphs of at least
    ``GENERAL_MIN_CHARS`` characters (SEAP's general samples are single WikiText lines; wiki's calibration
    articles give 3970 such paragraphs, median 522 characters)."""
    from prunekit.tasks import expand, leaf_tasks, prompt_pairs, prompts

    if not tasks:
        raise PrunekitError("corpus 'task' needs tasks: --data.corpus_options '{tasks: [piqa, arc_easy]}'")
    out = {}  # prunekit groups (seap7) give one source per task; an lm-eval group (mmlu) is one source
    for name in expand(tasks):
        if name != "perplexity":
            out[name] = [doc for task in leaf_tasks([name])
                         for doc in (prompt_pairs(task, split) if answered else prompts(task, split, answered=False))]
    if general:
        if general == "task" or general in out:
            raise PrunekitError(f"general corpus {general!r} would repeat a task source; name a text corpus (wiki)")
        out[general] = [p.strip() for doc in documents(general, split) for p in doc.split("\n\n")
                        if len(p.strip()) >= GENERAL_MIN_CHARS]
    return out


def token_windows(ids: torch.Tensor, seq_len: int, num: int, sampling: str, seed: int, what: str) -> torch.Tensor:
    """``num`` disjoint windows of ``seq_len`` tokens from a 1-D token stream (``num`` 0 = all of them)."""
    available = ids.numel() // seq_len
    if available == 0 or available < num:
        raise PrunekitError(
            f"{what} has {ids.numel()} tokens = {available} windows of {seq_len} tokens, but {num} are needed; "
            "lower num_samples/eval_samples or seq_len, or give a larger corpus"
        )
    slots = ids[: available * seq_len].view(available, seq_len)
    count = num or available
    if sampling == "contiguous":
        return slots[:count].clone()
    if sampling == "random":
        gen = torch.Generator().manual_seed(seed)
        return slots[torch.randperm(available, generator=gen)[:count]].clone()
    raise PrunekitError(f"sampling must be 'contiguous' or 'random', got {sampling!r}")


_TOKENS: dict[tuple, torch.Tensor] = {}  # (tokenizer, corpus, split, options) -> token stream, per process


class CalibrationDataModule(pl.LightningDataModule):
    """Token windows for calibration (``predict_dataloader``) and held-out evaluation (``eval_dataloader``).

    Args:
        tokenizer: model name or folder whose tokenizer is used (linked to ``--model.model`` by the CLI).
        corpus: calibration corpus name (``wiki``, ``text`` or a registered one).
        paths: files for the ``text`` corpus' calibration split.
        num_samples: number of calibration windows (documents with ``packing=documents``; 0 = all of them).
        seq_len: tokens per window (longest document with ``packing=documents``); checked against the
            model's maximum (never defaults to it).
        sampling: ``contiguous`` or ``random`` (seeded by ``seed``).
        packing: ``windows`` (fixed-length windows of the joined corpus) or ``documents`` (one sequence per
            document, batch size 1), see the module docstring.
        allow_fewer: with ``packing=documents``, a source holding fewer than ``num_samples`` documents gives
            all of them instead of raising.
        eval_corpus / eval_paths: held-out evaluation text (default: wiki's evaluation articles).
        eval_samples: number of evaluation windows (0 = every window of the split).
        batch_size: windows per forward pass.
        text_field: field holding the text in ``.jsonl`` files.
        corpus_options: extra keyword options passed to a registered corpus function.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        corpus: str = "wiki",
        paths: list[str] | None = None,
        num_samples: int = 32,
        seq_len: int = 512,
        sampling: Literal["contiguous", "random"] = "contiguous",
        seed: int = 0,
        packing: Literal["windows", "documents"] = "windows",
        allow_fewer: bool = False,
        eval_corpus: str = "wiki",
        eval_paths: list[str] | None = None,
        eval_samples: int = 40,
        batch_size: int = 1,
        text_field: str = "text",
        corpus_options: dict | None = None,
    ) -> None:
        super().__init__()
        if packing not in ("windows", "documents"):
            raise PrunekitError(f"data.packing must be 'windows' or 'documents', got {packing!r}")
        if packing == "documents" and batch_size != 1:
            raise PrunekitError(f"data.packing=documents feeds sequences of different lengths one at a time: "
                                f"set data.batch_size to 1 (got {batch_size})")
        for name, value, low in (("num_samples", num_samples, 0 if packing == "documents" else 1), ("seq_len", seq_len, 2),
                                 ("eval_samples", eval_samples, 0), ("batch_size", batch_size, 1)):
            if value < low:
                raise PrunekitError(f"data.{name} must be >= {low}, got {value}")
        if sampling not in ("contiguous", "random"):
            raise PrunekitError(f"data.sampling must be 'contiguous' or 'random', got {sampling!r}")
        self.tokenizer_name = tokenizer
        self.corpus, self.paths, self.num_samples, self.seq_len = corpus, paths, num_samples, seq_len
        self.sampling, self.seed, self.packing, self.allow_fewer = sampling, seed, packing, allow_fewer
        self.eval_corpus, self.eval_paths, self.eval_samples = eval_corpus, eval_paths, eval_samples
        self.batch_size, self.text_field = batch_size, text_field
        self.corpus_options = corpus_options or {}
        self._tokenizer = None
        self._calibration: torch.Tensor | None = None
        self._documents: list[torch.Tensor] | None = None
        self._labels: list[int] = []
        self._sources: list[str] = []
        self._masks: list[torch.Tensor] = []
        self._evaluation: torch.Tensor | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.tokenizer_name:
                raise PrunekitError("CalibrationDataModule needs a tokenizer (a model name or folder)")
            from prunekit.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def check_model(self, config) -> None:
        """Refuse a ``seq_len`` longer than the model accepts."""
        from prunekit.models import max_length

        limit = max_length(config)
        if limit is not None and self.seq_len > limit:
            raise PrunekitError(f"data.seq_len={self.seq_len} exceeds the model's maximum length {limit}; lower it")

    def _options(self, corpus: str, paths: list[str] | None) -> dict:
        options = dict(self.corpus_options) if corpus not in ("wiki", "text") else {}
        if corpus == "text":
            options = {"paths": paths, "text_field": self.text_field}
        return options

    def _tokens(self, corpus: str, split: Split, paths: list[str] | None) -> torch.Tensor:
        """The split's documents joined with blank lines, tokenized once per process (a packaged corpus and a
        tokenizer folder always give the same tokens; local text files are read afresh)."""
        import json

        options = self._options(corpus, paths)
        key = None if corpus == "text" else (self.tokenizer_name, corpus, split, json.dumps(options, sort_keys=True))
        if key is not None and key in _TOKENS:
            return _TOKENS[key]
        docs = documents(corpus, split, **options)
        ids = self.tokenizer("\n\n".join(text_of(d) for d in docs), return_attention_mask=False, verbose=False)["input_ids"]
        out = torch.tensor(ids, dtype=torch.long)
        if key is not None:
            _TOKENS[key] = out
        return out

    def calibration_sequences(self) -> list[torch.Tensor]:
        """The calibration token sequences (1-D), whatever the packing: what ``predict_dataloader`` serves."""
        if self.packing == "windows":
            return list(self.calibration_windows())
        if self._documents is None:
            groups = sourced_documents(self.corpus, "calibration", **self._options(self.corpus, self.paths))
            tok = self.tokenizer
            sequences, labels, masks = [], [], []
            for index, (name, docs) in enumerate(groups.items()):
                order = list(range(len(docs)))
                if self.sampling == "random":
                    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(self.seed)).tolist()
                count = self.num_samples or len(docs)
                if count > len(docs) and self.allow_fewer:
                    count = len(docs)
                if count > len(docs):
                    what = f"source {name!r} of corpus {self.corpus!r}" if len(groups) > 1 else f"corpus {self.corpus!r}"
                    raise PrunekitError(f"calibration {what} has {len(docs)} documents, but num_samples={count} are "
                                        "needed; lower num_samples (0 = all) or set data.allow_fewer=true")
                for i in order[:count]:
                    doc = docs[i]
                    ids = tok(text_of(doc), return_attention_mask=False, verbose=False)["input_ids"]
                    cut = max(0, len(ids) - self.seq_len) if not isinstance(doc, str) else 0
                    ids = ids[cut:cut + self.seq_len]  # an answered example loses its context's start, as lm-eval
                    if not ids:                        # truncates a request: the answer stays in
                        raise PrunekitError(f"calibration source {name!r} has a document with no tokens")
                    mask = torch.ones(len(ids), dtype=torch.bool)
                    mask[0] = False
                    if not isinstance(doc, str):  # the loss is on the continuation (as lm-eval splits a request)
                        context = len(tok(doc[0], return_attention_mask=False, verbose=False)["input_ids"]) - cut
                        mask[: max(1, min(context, len(ids)))] = False
                    sequences.append(torch.tensor(ids, dtype=torch.long))
                    labels.append(index)
                    masks.append(mask)
            self._documents, self._labels, self._sources = sequences, labels, list(groups)
            self._masks = masks
        return self._documents

    def calibration_sources(self) -> list[str] | None:
        """Source names (``packing=documents``; one per task of the ``task`` corpus), or None for windows."""
        if self.packing == "windows":
            return None
        self.calibration_sequences()
        return list(self._sources)

    def calibration_labels(self) -> list[int] | None:
        """Per calibration sequence, the index of its source in ``calibration_sources()`` (None for windows)."""
        if self.packing == "windows":
            return None
        self.calibration_sequences()
        return list(self._labels)

    def calibration_windows(self) -> torch.Tensor:
        if self.packing == "documents":
            raise PrunekitError("data.packing=documents has no fixed windows; use calibration_sequences()")
        if self._calibration is None:
            ids = self._tokens(self.corpus, "calibration", self.paths)
            what = f"calibration corpus {self.corpus!r}"
            self._calibration = token_windows(ids, self.seq_len, self.num_samples, self.sampling, self.seed, what)
        return self._calibration

    def evaluation_windows(self) -> torch.Tensor:
        if self._evaluation is None:
            ids = self._tokens(self.eval_corpus, "evaluation", self.eval_paths)
            what = f"evaluation corpus {self.eval_corpus!r}"
            self._evaluation = token_windows(ids, self.seq_len, self.eval_samples, "contiguous", 0, what)
        return self._evaluation

    def _loader(self, windows: torch.Tensor) -> DataLoader:
        return DataLoader(TensorDataset(windows), batch_size=self.batch_size, shuffle=False)

    def calibration_loss_masks(self) -> list[torch.Tensor]:
        """Per calibration sequence, the tokens a loss is taken on (the gold continuation of a task example;
        every token but the first otherwise)."""
        if self.packing == "windows":
            windows = self.calibration_windows()
            mask = torch.ones(windows.shape[1], dtype=torch.bool)
            mask[0] = False
            return [mask] * windows.shape[0]
        self.calibration_sequences()
        return list(self._masks)

    def predict_dataloader(self) -> DataLoader:
        """Calibration batches (dicts: ``input_ids``, ``index``, ``source``, ``loss_mask``)."""
        if self.packing == "documents":
            return sequence_loader(self.calibration_sequences(), self.calibration_labels(),
                                   self.calibration_loss_masks())
        windows = self.calibration_windows()
        return DataLoader(_Examples(list(windows), None, self.calibration_loss_masks()), batch_size=self.batch_size,
                          shuffle=False, collate_fn=_collate)

    def fingerprint(self) -> str:
        """sha256 of exactly what calibration reads: every sequence's tokens, source and loss mask."""
        import hashlib

        h = hashlib.sha256()
        labels = self.calibration_labels() or [-1] * len(self.calibration_sequences())
        h.update(repr(self.calibration_sources()).encode())
        for ids, label, mask in zip(self.calibration_sequences(), labels, self.calibration_loss_masks()):
            h.update(str(int(label)).encode())
            h.update(ids.to(torch.int64).numpy().tobytes())
            h.update(mask.numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """The calibration settings for records."""
        return {"corpus": self.corpus, "num_samples": self.num_samples, "seq_len": self.seq_len,
                "sampling": self.sampling, "seed": self.seed, "packing": self.packing,
                "corpus_options": self.corpus_options or None, "allow_fewer": self.allow_fewer}

    def describe_calibration(self) -> str:
        """One line for reports: what calibration read."""
        seqs = self.calibration_sequences()
        if self.packing == "documents":
            sources = ""
            if len(self._sources) > 1:
                counts = torch.bincount(torch.tensor(self._labels), minlength=len(self._sources)).tolist()
                sources = f" from {len(self._sources)} sources (" + ", ".join(
                    f"{name} {n}" for name, n in zip(self._sources, counts)) + ")"
            return (f"{self.corpus}, {len(seqs)} documents{sources} ({sum(s.numel() for s in seqs)} tokens, "
                    f"at most {self.seq_len} each; {self.sampling})")
        return f"{self.corpus}, {len(seqs)} x {self.seq_len} tokens ({self.sampling})"

    def eval_dataloader(self) -> DataLoader:
        return self._loader(self.evaluation_windows())


class _Examples(torch.utils.data.Dataset):
    """Calibration examples with their global index, source and loss mask (a distributed sampler splits them)."""

    def __init__(self, sequences: list[torch.Tensor], labels: list[int] | None, masks: list[torch.Tensor] | None) -> None:
        self.sequences, self.labels, self.masks = sequences, labels, masks

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict:
        ids = self.sequences[i]
        mask = self.masks[i] if self.masks is not None else None
        if mask is None:
            mask = torch.ones(ids.shape[-1], dtype=torch.bool)
            mask[0] = False
        return {"input_ids": ids, "index": i, "source": self.labels[i] if self.labels is not None else -1,
                "loss_mask": mask}


def _collate(items: list[dict]) -> dict:
    out = {"input_ids": torch.stack([it["input_ids"] for it in items]),
           "index": torch.tensor([it["index"] for it in items]),
           "loss_mask": torch.stack([it["loss_mask"] for it in items])}
    sources = [it["source"] for it in items]
    if any(src >= 0 for src in sources):
        out["source"] = torch.tensor(sources)
    return out


def sequence_loader(sequences: list[torch.Tensor], labels: list[int] | None = None,
                    masks: list[torch.Tensor] | None = None) -> DataLoader:
    """One 1-D token sequence per batch, in order (sequences of any lengths, no padding), as batch dicts with
    the example's index and, with ``labels``, its source; ``masks``: per sequence, its loss tokens."""
    if labels is not None and len(labels) != len(sequences):
        raise PrunekitError(f"{len(labels)} labels for {len(sequences)} sequences")
    if masks is not None and len(masks) != len(sequences):
        raise PrunekitError(f"{len(masks)} loss masks for {len(sequences)} sequences")
    return DataLoader(_Examples(sequences, labels, masks), batch_size=1, shuffle=False, collate_fn=_collate)
