"""Corpora, token windows and the CalibrationDataModule."""

import json

import pytest
import torch

from prunekit.data import (
    CalibrationDataModule,
    documents,
    token_windows,
    wiki,
    wiki_articles,
    wiki_split_of,
)
from prunekit.errors import PrunekitError
from prunekit.models import load_config


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep Hugging Face datasets' cache of the local test files out of the home folder."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


# ----------------------------------------------------------------------------- wiki corpus
def test_wiki_splits_are_disjoint_and_non_empty():
    articles = wiki_articles()
    titles = [t for t, _ in articles]
    assert len(titles) == len(set(titles))
    calibration = {t for t in titles if wiki_split_of(t) == "calibration"}
    evaluation = {t for t in titles if wiki_split_of(t) == "evaluation"}
    assert calibration and evaluation
    assert not calibration & evaluation
    assert calibration | evaluation == set(titles)
    # the corpus functions serve exactly those articles, and no document text is shared
    cal_docs, eval_docs = wiki("calibration"), wiki("evaluation")
    assert len(cal_docs) == len(calibration) and len(eval_docs) == len(evaluation)
    assert not set(cal_docs) & set(eval_docs)
    assert documents("wiki", "evaluation") == eval_docs
    # about 20% of the articles are held out; the rule depends only on the title
    assert 0.05 < len(evaluation) / len(titles) < 0.4
    assert all(wiki_split_of(t) == wiki_split_of(t) for t in titles)
    assert all(len(text) >= 500 and not text.upper().startswith("#REDIRECT") for _, text in articles)


def test_unknown_corpus_lists_available():
    with pytest.raises(PrunekitError, match=r"unknown corpus 'c4'.*text.*wiki"):
        documents("c4", "calibration")


# ----------------------------------------------------------------------------- token windows
def test_token_windows_contiguous_first_windows_in_order():
    ids = torch.arange(100)
    w = token_windows(ids, 10, 3, "contiguous", 0, "x")
    assert w.tolist() == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    assert token_windows(ids, 10, 0, "contiguous", 0, "x").tolist() == ids.view(10, 10).tolist()  # 0 = all
    assert token_windows(ids, 7, 14, "contiguous", 0, "x").shape == (14, 7)  # remainder dropped


def _starts(windows: torch.Tensor, seq_len: int) -> list[int]:
    """Start offsets of windows cut from arange ids; checks each window is one contiguous aligned slot."""
    starts = []
    for row in windows.tolist():
        assert row == list(range(row[0], row[0] + seq_len))
        assert row[0] % seq_len == 0
        starts.append(row[0])
    return starts


def test_token_windows_random_is_seeded_and_disjoint():
    ids = torch.arange(1000)
    a = token_windows(ids, 10, 8, "random", 0, "x")
    b = token_windows(ids, 10, 8, "random", 0, "x")
    c = token_windows(ids, 10, 8, "random", 1, "x")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for w in (a, c):
        starts = _starts(w, 10)
        assert len(set(starts)) == len(starts)  # distinct aligned slots: no token in two windows
        assert len(set(w.flatten().tolist())) == w.numel()
    assert _starts(a, 10) != sorted(_starts(a, 10)) or _starts(c, 10) != sorted(_starts(c, 10))  # not just the first
    # asking for every window gives a permutation of all slots
    everything = token_windows(ids, 10, 0, "random", 3, "x")
    assert sorted(_starts(everything, 10)) == list(range(0, 1000, 10))


def test_token_windows_too_short_reports_counts():
    ids = torch.arange(25)
    with pytest.raises(PrunekitError, match=r"my corpus has 25 tokens = 2 windows of 10 tokens, but 3 are needed"):
        token_windows(ids, 10, 3, "contiguous", 0, "my corpus")
    with pytest.raises(PrunekitError, match=r"has 5 tokens = 0 windows of 10 tokens"):
        token_windows(torch.arange(5), 10, 0, "random", 0, "tiny corpus")


def test_token_windows_bad_sampling():
    with pytest.raises(PrunekitError, match="sampling"):
        token_windows(torch.arange(100), 10, 2, "shuffled", 0, "x")


# ----------------------------------------------------------------------------- DataModule
def test_check_model_refuses_seq_len_above_maximum(tiny_models):
    for family, folder in tiny_models.items():
        config = load_config(str(folder))
        CalibrationDataModule(str(folder), seq_len=256).check_model(config)  # exactly the maximum: fine
        with pytest.raises(PrunekitError, match="seq_len=257 exceeds the model's maximum length 256"):
            CalibrationDataModule(str(folder), seq_len=257).check_model(config)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples must be >= 1"),
        ({"num_samples": -3}, "num_samples must be >= 1"),
        ({"seq_len": 1}, "seq_len must be >= 2"),
        ({"eval_samples": -1}, "eval_samples must be >= 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"sampling": "shuffle"}, "sampling must be 'contiguous' or 'random'"),
        ({"packing": "pack"}, "packing must be 'windows' or 'documents'"),
        ({"packing": "documents", "batch_size": 4}, "set data.batch_size to 1"),
        ({"packing": "documents", "num_samples": -1}, "num_samples must be >= 0"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(PrunekitError, match=match):
        CalibrationDataModule("unused", **kwargs)


def test_datamodule_needs_tokenizer():
    with pytest.raises(PrunekitError, match="needs a tokenizer"):
        CalibrationDataModule(None).calibration_windows()


def _docs(n: int, words: int = 60) -> list[str]:
    return [" ".join(f"document{i} word{j} of the test corpus." for j in range(words)) for i in range(n)]


def test_text_corpus_reads_txt_files(tiny_llama, tmp_path):
    texts = _docs(2)
    paths = []
    for i, text in enumerate(texts):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(text + "\nsecond line of the same document\n")
        paths.append(str(p))
    docs = documents("text", "calibration", paths=paths)
    assert len(docs) == 2  # one document per file, lines kept together
    for doc, text in zip(docs, texts):
        assert text in doc and "second line of the same document" in doc

    dm = CalibrationDataModule(str(tiny_llama), corpus="text", paths=paths, num_samples=3, seq_len=16)
    windows = dm.calibration_windows()
    ids = dm.tokenizer("\n\n".join(docs), return_attention_mask=False)["input_ids"]
    assert windows.shape == (3, 16)
    assert windows.flatten().tolist() == ids[:48]
    batches = list(dm.predict_dataloader())
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), windows)
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 1, 2]


def test_text_corpus_reads_jsonl_with_text_field(tiny_llama, tmp_path):
    texts = _docs(3)
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)) + "\n")
    assert documents("text", "calibration", paths=[str(p)], text_field="body") == texts

    dm = CalibrationDataModule(str(tiny_llama), corpus="text", paths=[str(p)], text_field="body",
                               num_samples=2, seq_len=8, sampling="random", seed=5)
    ids = dm.tokenizer("\n\n".join(texts), return_attention_mask=False)["input_ids"]
    windows = dm.calibration_windows()
    assert torch.equal(windows, token_windows(torch.tensor(ids), 8, 2, "random", 5, "x"))

    with pytest.raises(PrunekitError, match=r"no field 'text'.*\['id', 'body'\]"):
        documents("text", "calibration", paths=[str(p)])
    dm_bad = CalibrationDataModule(str(tiny_llama), corpus="text", paths=[str(p)], num_samples=2, seq_len=8)
    with pytest.raises(PrunekitError, match="no field 'text'"):
        dm_bad.calibration_windows()


def test_text_corpus_errors(tmp_path):
    txt, jsonl = tmp_path / "a.txt", tmp_path / "b.jsonl"
    txt.write_text("hello")
    jsonl.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(PrunekitError, match="needs file paths"):
        documents("text", "calibration")
    with pytest.raises(PrunekitError, match="not found"):
        documents("text", "calibration", paths=[str(tmp_path / "missing.txt")])
    with pytest.raises(PrunekitError, match="all be .txt or all .jsonl"):
        documents("text", "calibration", paths=[str(txt), str(jsonl)])
    csv = tmp_path / "c.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(PrunekitError, match="all be .txt or all .jsonl"):
        documents("text", "calibration", paths=[str(csv)])
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(PrunekitError, match="no documents in its calibration split"):
        documents("text", "calibration", paths=[str(empty)])


def test_text_corpus_too_short_for_windows(tiny_llama, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("just a few words")
    dm = CalibrationDataModule(str(tiny_llama), corpus="text", paths=[str(p)], num_samples=4, seq_len=64)
    with pytest.raises(PrunekitError, match=r"calibration corpus 'text' has \d+ tokens = 0 windows of 64 tokens"):
        dm.calibration_windows()


def test_wiki_datamodule_windows(tiny_llama):
    dm = CalibrationDataModule(str(tiny_llama), num_samples=3, seq_len=32, eval_samples=2, sampling="random", seed=1)
    cal, ev = dm.calibration_windows(), dm.evaluation_windows()
    assert cal.shape == (3, 32) and ev.shape == (2, 32)
    assert cal.dtype == torch.long and int(cal.max()) < dm.tokenizer.vocab_size
    assert dm.calibration_windows() is cal  # tokenized once
    # evaluation text comes from the held-out articles only
    eval_text = "\n\n".join(wiki("evaluation"))
    assert dm.tokenizer.decode(ev[0].tolist()) in eval_text
    assert dm.tokenizer.decode(cal[0].tolist()) in "\n\n".join(wiki("calibration"))


# ----------------------------------------------------------------------------- documents packing, task corpus
def test_documents_packing_one_sequence_per_document(tiny_llama, tmp_path):
    texts = [f"short document number {i} " * (3 + 4 * i) for i in range(5)]
    paths = []
    for i, text in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(text)
        paths.append(str(tmp_path / f"d{i}.txt"))
    docs = documents("text", "calibration", paths=paths)
    full = [CalibrationDataModule(str(tiny_llama)).tokenizer(d, return_attention_mask=False)["input_ids"] for d in docs]
    cut = sorted(len(f) for f in full)[2]  # the two longest documents are truncated
    dm = CalibrationDataModule(str(tiny_llama), corpus="text", paths=paths, packing="documents", num_samples=0,
                               seq_len=cut)
    seqs = dm.calibration_sequences()
    expected = [f[:cut] for f in full]
    assert [s.tolist() for s in seqs] == expected  # every document, in order, truncated to seq_len
    assert len({len(s) for s in seqs}) == 3 and max(len(s) for s in seqs) == cut
    batches = [b["input_ids"] for b in dm.predict_dataloader()]
    assert [b.shape for b in batches] == [(1, len(s)) for s in seqs]
    assert "5 documents" in dm.describe_calibration()

    def chosen(seed):
        dm = CalibrationDataModule(str(tiny_llama), corpus="text", paths=paths, packing="documents", num_samples=3,
                                   seq_len=cut, sampling="random", seed=seed)
        return [s.tolist() for s in dm.calibration_sequences()]

    assert chosen(1) == chosen(1) and len(chosen(1)) == 3
    assert all(s in expected for s in chosen(1))
    assert any(chosen(seed) != chosen(1) for seed in (2, 3, 4))
    with pytest.raises(PrunekitError, match="has no fixed windows"):
        dm.calibration_windows()
    too_many = CalibrationDataModule(str(tiny_llama), corpus="text", paths=paths, packing="documents", num_samples=9)
    with pytest.raises(PrunekitError, match="has 5 documents, but num_samples=9"):
        too_many.calibration_sequences()


def test_task_corpus_serves_rendered_task_examples(tiny_llama):
    from prunekit.data import text_of
    from prunekit.tasks import prompt_pairs, prompts

    pairs = documents("task", "calibration", tasks="copa")
    assert pairs == prompt_pairs("copa") and [text_of(d) for d in pairs] == prompts("copa")
    assert [text_of(d) for d in documents("task", "evaluation", tasks=["copa"])] == prompts("copa", "evaluation")
    both = documents("task", "calibration", tasks=["copa", "winogrande"])
    assert [text_of(d) for d in both] == prompts("copa") + prompts("winogrande")
    bare = documents("task", "calibration", tasks="copa", answered=False)
    assert bare == prompts("copa", answered=False)
    with pytest.raises(PrunekitError, match="corpus 'task' needs tasks"):
        documents("task", "calibration")
    from prunekit.data import GENERAL_MIN_CHARS, sourced_documents

    from prunekit.tasks import leaf_tasks

    groups = sourced_documents("task", "calibration", tasks=["copa", "mmlu_stem"], general="wiki")
    assert list(groups) == ["copa", "mmlu_stem", "wiki"]  # an lm-eval group is one source of all its subjects
    assert [text_of(d) for d in groups["mmlu_stem"]] == [t for task in leaf_tasks("mmlu_stem") for t in prompts(task)]
    assert len(groups["wiki"]) == 3970 and min(len(p) for p in groups["wiki"]) >= GENERAL_MIN_CHARS
    assert all(p in documents("wiki", "calibration")[0] for p in groups["wiki"][:3])  # paragraphs of the articles
    with pytest.raises(PrunekitError, match="would repeat a task source"):
        sourced_documents("task", "calibration", tasks=["copa"], general="task")
    dm = CalibrationDataModule(str(tiny_llama), corpus="task", corpus_options={"tasks": ["copa"]},
                               packing="documents", num_samples=0, seq_len=128)
    assert len(dm.calibration_sequences()) == len(prompts("copa")) == 12
    # the loss mask of an answered example marks its gold continuation: the tokens after the context's
    tok = dm.tokenizer
    for ids, mask, (context, continuation) in zip(dm.calibration_sequences(), dm.calibration_loss_masks(), pairs):
        assert ids.tolist() == tok(context + continuation)["input_ids"][:128]
        start = len(tok(context)["input_ids"])
        assert not mask[:start].any() and mask[start:].all() and mask.numel() > start
    batch = next(iter(dm.predict_dataloader()))
    assert set(batch) == {"input_ids", "index", "source", "loss_mask"} and batch["loss_mask"].shape == batch["input_ids"].shape


def test_allow_fewer_gives_a_short_source_all_it_has(tiny_llama):
    """SEAP asks 200 prompts per task; WinoGrande reserves 124 for calibration: an error unless allow_fewer."""
    from prunekit.tasks import prompts

    options = {"corpus": "task", "corpus_options": {"tasks": ["copa", "winogrande"]}, "packing": "documents",
               "num_samples": 20, "seq_len": 128, "sampling": "random"}
    with pytest.raises(PrunekitError, match="source 'copa' of corpus 'task' has 12 documents.*allow_fewer"):
        CalibrationDataModule(str(tiny_llama), **options).calibration_sequences()
    dm = CalibrationDataModule(str(tiny_llama), allow_fewer=True, **options)
    assert len(dm.calibration_sequences()) == len(prompts("copa")) + 20
    assert dm.calibration_labels().count(0) == 12 and dm.calibration_labels().count(1) == 20
    assert "2 sources (copa 12, winogrande 20)" in dm.describe_calibration()
