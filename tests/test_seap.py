"""SEAP and SEAP-gen: per-task statistics in one pass, expert and general masks, the reference's score formula."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.api import prune
from prunekit.cli import main
from prunekit.data import sequence_loader
from prunekit.errors import PrunekitError
from prunekit.module import PrunableLM
from prunekit.plans import LayerCut, PlanSet, UnitCut
from prunekit.realize.routed import RoutedModel
from prunekit.strategies.seap import SEAP, SEAPGen, wifv

G = torch.Generator().manual_seed(0)
TASK_A = [torch.randint(0, 150, (n,), generator=G) for n in (9, 14, 6, 11)]  # two "tasks" with different tokens
TASK_B = [torch.randint(150, 300, (n,), generator=G) for n in (12, 7, 10)]


class _Sourced:
    """A DataModule stand-in: sequences with their source, as CalibrationDataModule(packing=documents) serves."""

    def __init__(self, groups: dict[str, list[torch.Tensor]]) -> None:
        self.sources = list(groups)
        self.seqs = [s for seqs in groups.values() for s in seqs]
        self.labels = [i for i, seqs in enumerate(groups.values()) for _ in seqs]

    def calibration_sources(self):
        return self.sources

    def predict_dataloader(self):
        return sequence_loader(self.seqs, self.labels)


def _run(folder, strategy, groups) -> PrunableLM:
    """Calibrate, decide and realize through the public API. The strategy object gets, for the checks below,
    ``removed`` ({layer: {"heads", "channels"}} of a unit cut), ``plan`` and ``statistics_`` (every observed
    statistic per linear name, as ``"<stat>.<field>"``)."""
    module = PrunableLM(str(folder))
    out = prune(strategy, module, _Sourced(groups))
    strategy.plan = out.plan
    if isinstance(out.plan, UnitCut):
        strategy.removed = {i: {"heads": c.heads, "channels": c.channels} for i, c in out.plan.cuts.items()}
    strategy.statistics_ = {name: {f"{k}.{f}": v for k, stat in group.items() for f, v in stat.tensors().items()}
                            for name, group in out.calibration.observed().items()}
    return module


OPTS = {"allocation": "uniform", "sparsity": 0.25}


def test_statistics_per_task_equal_a_direct_computation(tiny_llama):
    """One pass over the mixed corpus; each task's o_proj/down_proj input moments equal torch on its tokens."""
    strategy = SEAP(task="A", **OPTS)
    _run(tiny_llama, strategy, {"A": TASK_A, "B": TASK_B})
    dense = PrunableLM(str(tiny_llama)).model
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: captured.setdefault(n, []).append(a[0][0].double()))
             for n, m in dense.named_modules() if n.endswith(("o_proj", "down_proj"))]
    inputs = {}
    for task, seqs in (("A", TASK_A), ("B", TASK_B)):
        captured.clear()
        with torch.no_grad():
            for s in seqs:
                dense(input_ids=s[None])
        inputs[task] = {n: torch.cat(xs) for n, xs in captured.items()}
    for h in hooks:
        h.remove()
    for name in inputs["A"]:
        for task in ("A", "B"):
            x = inputs[task][name]
            st = strategy.statistics_[name]
            assert st[f"moments@{task}.count"].item() == x.shape[0]
            torch.testing.assert_close(st[f"moments@{task}.mean"], x.mean(0))
            torch.testing.assert_close(st[f"moments@{task}.m2"] / x.shape[0], x.var(0, unbiased=False))
        both = torch.cat([inputs["A"][name], inputs["B"][name]])  # the merged statistic covers every source
        torch.testing.assert_close(strategy.statistics_[name]["moments.m2"] / both.shape[0], both.var(0, unbiased=False))


@pytest.mark.parametrize("mode", ["all-at-once", "sequential"])
def test_one_pass_over_mixed_tasks_equals_a_pass_per_task(tiny_llama, mode):
    mixed = SEAP(task="B", mode=mode, **OPTS)
    alone = SEAP(mode=mode, **OPTS)  # the only source
    m1 = _run(tiny_llama, mixed, {"A": TASK_A, "B": TASK_B})
    m2 = _run(tiny_llama, alone, {"B": TASK_B})
    assert mixed.removed == alone.removed and any(r["heads"] or r["channels"] for r in mixed.removed.values())
    for (n1, p1), (n2, p2) in zip(m1.model.state_dict().items(), m2.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    other = SEAP(task="A", mode=mode, **OPTS)
    _run(tiny_llama, other, {"A": TASK_A, "B": TASK_B})
    assert other.removed != mixed.removed  # the tasks' statistics really differ


def test_seap_gen_is_the_weighted_sum_of_task_scores(tiny_llama):
    only_a = SEAPGen(weights={"A": 1.0, "B": 0.0}, **OPTS)
    _run(tiny_llama, only_a, {"A": TASK_A, "B": TASK_B})
    expert = SEAP(task="A", **OPTS)
    _run(tiny_llama, expert, {"A": TASK_A, "B": TASK_B})
    assert only_a.removed == expert.removed

    # channels only, so each layer removes int(0.25 * width) channels: check them against the formula
    gen = SEAPGen(weights={"A": 2.0, "*": 3.0}, prune_heads=False, **OPTS)
    _run(tiny_llama, gen, {"A": TASK_A, "B": TASK_B})
    dense = PrunableLM(str(tiny_llama)).model
    for i, layer in enumerate(dense.model.layers):
        name = f"model.layers.{i}.mlp.down_proj"
        st = gen.statistics_[name]
        var = {t: st[f"moments@{t}.m2"] / st[f"moments@{t}.count"] for t in "AB"}
        w = layer.mlp.down_proj.weight
        score = 2 * wifv(var["A"], w) + 3 * wifv(var["B"], w)
        expected = sorted(torch.sort(score, stable=True)[1][: int(0.25 * w.shape[1])].tolist())
        assert gen.removed[i]["channels"] == expected


def test_head_score_is_the_mean_of_its_dimensions():
    dims = torch.arange(8, dtype=torch.float64)
    torch.testing.assert_close(SEAP().head_scores(dims, 2), torch.tensor([1.5, 5.5], dtype=torch.float64))


@pytest.mark.parametrize(
    ("strategy", "groups", "message"),
    [(lambda: SEAP(**OPTS), {"A": TASK_A, "B": TASK_B}, "choose the task with --strategy.task"),
     (lambda: SEAP(task="C", **OPTS), {"A": TASK_A, "B": TASK_B}, "'C' is not among the calibration sources"),
     (lambda: SEAPGen(weights={"C": 1}, **OPTS), {"A": TASK_A}, "not calibration sources"),
     (lambda: SEAPGen(weights={"A": 0, "*": 0}, **OPTS), {"A": TASK_A}, "every source weight 0")],
)
def test_bad_task_choices_are_refused(tiny_llama, strategy, groups, message):
    with pytest.raises(PrunekitError, match=message):
        _run(tiny_llama, strategy(), groups)


def test_seap_needs_sourced_calibration_data(tiny_llama):
    class Windows:
        def calibration_sources(self):
            return None

        def predict_dataloader(self):
            return sequence_loader(TASK_A)

    with pytest.raises(PrunekitError, match="--data.packing documents"):
        prune(SEAP(**OPTS), str(tiny_llama), Windows())
    with pytest.raises(PrunekitError, match="seap-gen combines every source"):
        SEAPGen(task="A")
    with pytest.raises(PrunekitError, match=">= 0"):
        SEAPGen(weights={"A": -1})


def _seap_cli(model, out, *options: str, corpus: str = "{tasks: [copa, boolq]}") -> int:
    return main(["prune", "--model", str(model), "--strategy", "seap", *options,
                 "--strategy.allocation", "uniform", "--strategy.sparsity", "0.3", "--data.corpus", "task",
                 "--data.corpus_options", corpus, "--data.packing", "documents", "--data.num_samples", "6",
                 "--data.seq_len", "64", "--data.eval_samples", "2", "--output_dir", str(out)])


def test_prune_cli_with_task_corpus(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "seap"
    assert _seap_cli(tiny_llama, out, "--strategy.task", "boolq", corpus="{tasks: [copa, boolq], general: wiki}") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "boolq" and metrics["strategy"] == "seap"
    assert metrics["pruned"]["pruned_fraction"] == pytest.approx(0.3, abs=0.03)
    assert metrics["data"]["packing"] == "documents"


# ----------------------------------------------------------------------------- experts and the task-routed model
@pytest.mark.parametrize("compensate", [False, True])
def test_expert_plans_build_exactly_the_in_place_experts(tiny_llama, compensate):
    groups = {"A": TASK_A, "B": TASK_B}
    multi = SEAP(tasks=["all"], bias_compensation=compensate, **OPTS)
    module = _run(tiny_llama, multi, groups)
    assert isinstance(multi.plan, PlanSet) and sorted(multi.plan.plans) == ["A", "B"]
    dense_state = {k: v.clone() for k, v in PrunableLM(str(tiny_llama)).model.state_dict().items()}
    for k, v in module.model.state_dict().items():  # the model stays dense
        assert torch.equal(v, dense_state[k]), k
    routed = RoutedModel(module.model, multi.plan)
    ids = TASK_A[1][None]
    for task in ("A", "B"):
        single = SEAP(task=task, bias_compensation=compensate, **OPTS)
        expected = _run(tiny_llama, single, groups).model
        assert {i: (c.heads, c.channels) for i, c in multi.plan.plans[task].cuts.items() if c} == \
               {i: (r["heads"], r["channels"]) for i, r in single.removed.items() if r["heads"] or r["channels"]}
        assert multi.plan.plans[task].bias.keys() == single.plan.bias.keys()
        with torch.no_grad():
            torch.testing.assert_close(routed.model_for(task)(input_ids=ids).logits, expected(input_ids=ids).logits,
                                       rtol=0, atol=1e-5)


def _cuts(spec: dict) -> PlanSet:
    return PlanSet({name: UnitCut({i: LayerCut(h, c) for i, (h, c) in layers.items()}) for name, layers in spec.items()})


def test_routed_model_shares_untouched_modules_and_bounds_its_cache(tiny_llama, tmp_path):
    dense = PrunableLM(str(tiny_llama)).model
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    routed = RoutedModel(dense, _cuts({"a": {1: ([0, 1], [3, 4, 5])}, "b": {0: ([], [0])}, "c": {2: ([2, 3], [])}}),
                         max_cached=2)
    a = routed.model_for("a")
    assert a.model.embed_tokens is dense.model.embed_tokens and a.lm_head is dense.lm_head
    assert a.model.layers[0] is dense.model.layers[0] and a.model.layers[1] is not dense.model.layers[1]
    assert a.model.layers[1].mlp.down_proj.in_features == dense.model.layers[1].mlp.down_proj.in_features - 3
    assert routed.model_for("a") is a
    routed.model_for("b"), routed.model_for("c")
    assert list(routed._cache) == ["b", "c"]  # "a" was least recently used
    for k, v in dense.state_dict().items():
        assert torch.equal(v, before[k]), k  # building experts never touches the dense weights
    with pytest.raises(PrunekitError, match="no member 'd'"):
        routed.model_for("d")
    with pytest.raises(PrunekitError, match="has no router"):
        routed.route("hello")


def test_routed_model_round_trips_through_a_folder(tiny_llama, tmp_path):
    import prunekit
    from prunekit.models import load_tokenizer
    from prunekit.realize import realizer_for

    dense = PrunableLM(str(tiny_llama)).model
    plans = _cuts({"a": {1: ([0, 1], [3, 4, 5])}, "b": {2: ([], [7])}})
    plans.plans["a"].bias = {"model.layers.1.mlp.down_proj": torch.randn(dense.config.hidden_size)}
    routed = realizer_for(plans).apply(dense, plans, tokenizer=load_tokenizer(str(tiny_llama)))
    (tmp_path / "r").mkdir()
    realizer_for(plans).save(routed, tmp_path / "r")
    back = prunekit.load_pruned(tmp_path / "r")
    assert isinstance(back, RoutedModel) and back.names == ["a", "b"]
    ids = TASK_A[0][None]
    with torch.no_grad():
        for task in ("a", "b"):
            assert torch.equal(back.model_for(task)(input_ids=ids).logits, routed.model_for(task)(input_ids=ids).logits)
    member, text = back.generate("the", member="a", max_new_tokens=4)
    assert member == "a" and isinstance(text, str)


def test_expert_options_are_checked():
    with pytest.raises(PrunekitError, match="either --strategy.task"):
        SEAP(task="A", tasks=["B"])
    with pytest.raises(PrunekitError, match="all-at-once"):
        SEAP(tasks=["all"], mode="sequential")
    with pytest.raises(PrunekitError, match="for task experts use --strategy seap"):
        SEAPGen(tasks=["all"])


def test_prune_experts_then_eval_scores_each_task_with_its_expert(tiny_llama, tmp_path, monkeypatch):
    import prunekit

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "experts"
    assert _seap_cli(tiny_llama, out, "--strategy.tasks", "[all]", "--strategy.router_per_task", "6") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    members = metrics["pruned"]["members"]
    assert sorted(members) == ["boolq", "copa"] and metrics["plan"] == "plan_set"
    for row in members.values():
        assert row["pruned_fraction"] == pytest.approx(0.3, abs=0.03) and row["perplexity"] > 1
    assert (out / "members_profile.png").is_file() and (out / "prunekit_plans.json").is_file()
    routed = prunekit.load_pruned(out)
    assert routed.names == ["copa", "boolq"]
    router = metrics["pruned"]["router"]  # trained on the calibration prompts, scored on held-out evaluation prompts
    assert set(router["per_task"]) == {"copa", "boolq"} and router["per_task"]["boolq"]["held_out"] == 6
    assert routed.route(routed.tokenizer.decode(routed.tokenizer("Is the sky blue?")["input_ids"])) in ("copa", "boolq")

    ev = tmp_path / "ev"
    assert main(["eval", "--model", str(out), "--tasks", "[perplexity, copa, boolq]", "--limit", "3",
                 "--data.seq_len", "64", "--data.eval_samples", "2", "--output_dir", str(ev)]) == 0
    result = json.loads((ev / "metrics.json").read_text())
    assert result["tasks"]["members"] == {"copa": "copa", "boolq": "boolq"}
    assert set(result["tasks"]["tasks"]) == {"copa", "boolq"}
    assert result["members"]["copa"]["perplexity"] == pytest.approx(members["copa"]["perplexity"], rel=1e-5)
    # the expert really is what scored the task: copa's expert alone gives the same accuracy
    from prunekit.models import load_tokenizer
    from prunekit.zeroshot import evaluate_tasks

    alone = evaluate_tasks(routed.model_for("copa"), load_tokenizer(str(out)), ["copa"], limit=3)
    assert alone["tasks"]["copa"]["acc"] == result["tasks"]["tasks"]["copa"]["acc"]
    assert main(["eval", "--model", str(out), "--tasks", "[piqa]", "--output_dir", str(tmp_path / "x")]) == 2


def test_router_learns_separable_tasks_and_round_trips(tiny_llama, tmp_path):
    from prunekit.models import load_tokenizer
    from prunekit.strategies.seap.router import TaskRouter, train_router

    model, tok = PrunableLM(str(tiny_llama)).model, load_tokenizer(str(tiny_llama))
    router, report = train_router(model, tok, ["boolq", "winogrande"], per_task=40, held_out=40, epochs=30,
                                  enable_progress_bar=False)
    # boolq prompts carry a passage and "Question: ...?\nAnswer:"; winogrande's are one sentence: easy to tell apart
    assert report["accuracy"] > 0.8 and report["chance"] == 0.5
    assert set(report["per_task"]) == {"boolq", "winogrande"}
    router.save(tmp_path / "r.safetensors")
    back = TaskRouter.load(tmp_path / "r.safetensors")
    texts = ["Paris -- Paris is the capital.\nQuestion: is paris the capital of france?\nAnswer:", "The cat sat on the"]
    assert back.predict(model, tok, texts) == router.predict(model, tok, texts)
    with pytest.raises(PrunekitError, match="at least two tasks"):
        TaskRouter(["boolq"], 8)


def test_logistic_schedule_keeps_the_ends_dense_and_meets_the_ratio(tmp_path):
    """SEAP's default structure on an 8-layer model: layers 0, 1, 6, 7 untouched, later layers pruned more, and
    the attention+MLP weights removed overall equal the requested ratio (parameter-weighted)."""
    import tiny
    from prunekit.evaluate import linear_totals

    folder = tiny.make_model("llama", tmp_path / "deep", layers=8)
    strategy = SEAP(sparsity=0.3)
    module = _run(folder, strategy, {"A": TASK_A})
    removed = {layer: len(r["heads"]) * 1000 + len(r["channels"]) for layer, r in strategy.removed.items()}
    assert all(removed.get(i, 0) == 0 for i in (0, 1, 6, 7)) and all(removed[i] > 0 for i in (2, 3, 4, 5))
    dense = PrunableLM(str(folder)).model

    def layer_weights(model, i):
        return sum(p.numel() for n, p in model.model.layers[i].named_parameters() if n.endswith("proj.weight"))

    fractions = [1 - layer_weights(module.model, i) / layer_weights(dense, i) for i in (2, 3, 4, 5)]
    assert fractions == sorted(fractions) and fractions[0] < fractions[-1]  # sparsity grows with depth
    assert 1 - linear_totals(module.model)["linear"] / linear_totals(dense)["linear"] == pytest.approx(0.3, abs=0.02)


def test_pruning_from_saved_statistics_equals_calibrating(tiny_llama, tmp_path, monkeypatch):
    """One calibration pass serves several runs: seap-gen at another ratio from seap's saved statistics gives the
    same model as seap-gen calibrating itself; wrong files and sequential mode are refused."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    corpus = "{tasks: [copa, boolq], general: wiki}"
    assert _seap_cli(tiny_llama, tmp_path / "first", "--strategy.task", "copa", "--save_statistics", "true",
                     corpus=corpus) == 0
    saved = tmp_path / "first" / "statistics.safetensors"

    def gen(out, *extra):
        return main(["prune", "--model", str(tiny_llama), "--strategy", "seap-gen", "--strategy.sparsity", "0.5",
                     "--strategy.allocation", "uniform",
                     "--data.corpus", "task", "--data.corpus_options", corpus, "--data.packing", "documents",
                     "--data.num_samples", "6", "--data.seq_len", "64", "--data.eval_samples", "2",
                     "--output_dir", str(tmp_path / out), *extra])

    assert gen("calibrated") == 0 and gen("from-file", "--statistics", str(saved)) == 0
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("calibrated", "from-file"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((tmp_path / "from-file" / "metrics.json").read_text())
    assert metrics["data"]["statistics"] == str(saved)
    assert metrics["pruned"]["pruned_fraction"] == pytest.approx(0.5, abs=0.03)

    assert gen("missing", "--statistics", str(tmp_path / "nope.safetensors")) == 2
    assert main(["prune", "--model", str(tiny_llama), "--strategy", "wanda", "--data.eval_samples", "2",
                 "--data.seq_len", "64", "--statistics", str(saved), "--output_dir", str(tmp_path / "w")]) == 2
    assert not (tmp_path / "missing").exists() and not (tmp_path / "w").exists()
    assert main(["prune", "--model", str(tiny_llama), "--strategy", "wanda", "--strategy.mode", "sequential",
                 "--data.eval_samples", "2", "--data.seq_len", "64", "--statistics", str(saved),
                 "--output_dir", str(tmp_path / "seq")]) == 2
    assert not (tmp_path / "seq").exists()
