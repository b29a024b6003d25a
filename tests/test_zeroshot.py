"""lm-eval through prunekit: every packaged task end to end on a tiny model; SmolLM2 well above chance."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

import tiny
from prunekit.cli import main
from prunekit.tasks import MMLU_SUBJECTS
from prunekit.zeroshot import evaluate_tasks, format_table


def test_tiny_model_runs_every_task(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    summary = evaluate_tasks(model, tiny.tokenizer(), ["zeroshot", "gsm8k", "mmlu"], limit=2, batch_size=4,
                             max_gen_toks=8)
    expected = {"piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "openbookqa", "boolq", "copa", "gsm8k",
                *(f"mmlu_{s}" for s in MMLU_SUBJECTS)}
    assert set(summary["tasks"]) == expected
    for name, row in summary["tasks"].items():
        assert row["n"] == 2, name
        scores = [v for k, v in row.items() if k != "n" and "stderr" not in k]
        assert scores and all(0 <= v <= 1 for v in scores), (name, row)
    assert "acc_norm" in summary["tasks"]["piqa"] and "acc_norm" not in summary["tasks"]["winogrande"]
    assert "exact_match[strict-match]" in summary["tasks"]["gsm8k"]
    assert summary["groups"]["mmlu"]["n"] == 2 * 57
    assert 0 <= summary["average"]["acc"] <= 1
    assert "| mmlu | acc |" in format_table(summary)


def test_eval_cli_tasks(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(tiny_llama), "--tasks", "[perplexity, copa, boolq]", "--limit", "3",
                 "--data.seq_len", "64", "--data.eval_samples", "2", "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["perplexity"] > 1
    assert set(metrics["tasks"]["tasks"]) == {"copa", "boolq"}
    assert metrics["tasks"]["tasks"]["copa"]["n"] == 3
    assert (out / "lm_eval_results.json").is_file()


def test_eval_cli_rejects_unknown_task(tiny_llama, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_llama), "--tasks", "[pika]", "--output_dir", str(tmp_path / "x")]) == 2
    assert "unknown task 'pika'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.real
def test_smollm2_is_well_above_chance_on_piqa_and_arc_easy():
    """A guard against a broken prompt format: lm-eval's first 100 documents of each (PIQA chance 0.5, ARC-e 0.25)."""
    from prunekit.models import load_model, load_tokenizer

    model, tokenizer = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    summary = evaluate_tasks(model, tokenizer, ["piqa", "arc_easy"], limit=100, batch_size=16)
    piqa, arc = summary["tasks"]["piqa"]["acc"], summary["tasks"]["arc_easy"]["acc"]
    print(f"\nSmolLM2-135M-Instruct, first 100 documents: piqa acc {piqa:.3f} "
          f"(acc_norm {summary['tasks']['piqa']['acc_norm']:.3f}), arc_easy acc {arc:.3f} "
          f"(acc_norm {summary['tasks']['arc_easy']['acc_norm']:.3f})")
    assert piqa > 0.6 and arc > 0.45


def test_eval_tasks_logged_to_wandb_offline(tiny_llama, tmp_path):
    """`eval --tasks` with W&B offline: task metrics in the run file and the results table as a media file."""
    from tiny import run_with_wandb_offline

    run = run_with_wandb_offline(["eval", "--model", str(tiny_llama), "--tasks", "[copa]", "--limit", "2"], tmp_path)
    assert b"copa/acc" in next(run.glob("*.wandb")).read_bytes()
    assert any(p.name.startswith("tasks") for p in (run / "files" / "media" / "table").glob("*.json"))
