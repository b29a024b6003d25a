"""Task router: which task's expert should serve a prompt (SEAP §4.4, Table 6).

Features are the model's layer-0 representation of the prompt: the mean of its input token embeddings
(``model.get_input_embeddings()``, no transformer layer runs), standardised with the training set's mean and
standard deviation. The classifier is a single linear layer trained with cross-entropy (multinomial logistic
regression) by a Lightning ``Trainer``; held-out precision, recall and F1 per task come from torchmetrics.

Reference (IAAR-Shanghai/SEAP ``notebook/4_classifier.ipynb``): scikit-learn ``LogisticRegression`` (lbfgs,
L2, C=1) on mean-pooled token embeddings of the task prompts *without* answers, six classes downsampled to the
smallest, a random 80/20 split; 0.93 accuracy on Llama-2-7B. Here: the same model family and features; the
prompts are lm-eval's zero-shot contexts (``prunekit.tasks.prompts(answered=False)``), training draws up to
``per_task`` examples per task from the calibration split (balanced by the loss' class weights rather than by
discarding examples) and the held-out set is the task's *evaluation* split (never seen in training); L2 is
weight decay; Adam replaces lbfgs (the optimum is the same convex problem's, up to the stopping point).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.plans import Router


@torch.no_grad()
def prompt_features(model: nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(prompts, hidden): mean input-token embedding of each prompt, float32."""
    embed = model.get_input_embeddings()
    rows = []
    for text in prompts:
        ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
        if not ids:
            raise PrunekitError(f"prompt {text[:40]!r} has no tokens")
        rows.append(embed(torch.tensor(ids, device=embed.weight.device)).float().mean(0).cpu())
    return torch.stack(rows)


class TaskRouter(nn.Module, Router):
    """Standardise the features, then one linear layer: logits over ``tasks`` (a plan set's ``Router``)."""

    def __init__(self, tasks: list[str], hidden: int) -> None:
        super().__init__()
        if len(tasks) < 2:
            raise PrunekitError(f"a router needs at least two tasks, got {tasks}")
        self.tasks = list(tasks)
        self.linear = nn.Linear(hidden, len(tasks))
        self.register_buffer("mean", torch.zeros(hidden))
        self.register_buffer("std", torch.ones(hidden))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)

    def route(self, model: nn.Module, tokenizer, prompts: list[str]) -> list[str]:
        return self.predict(model, tokenizer, prompts)

    @torch.no_grad()
    def predict(self, model: nn.Module, tokenizer, prompts: list[str]) -> list[str]:
        logits = self(prompt_features(model, tokenizer, prompts))
        return [self.tasks[i] for i in logits.argmax(1).tolist()]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"tasks": ",".join(self.tasks)})

    @classmethod
    def load(cls, path: str | Path) -> "TaskRouter":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            tasks = f.metadata()["tasks"].split(",")
            state = {k: f.get_tensor(k) for k in f.keys()}
        router = cls(tasks, state["mean"].numel())
        router.load_state_dict(state)
        return router.eval()


class _RouterModule(pl.LightningModule):
    def __init__(self, router: TaskRouter, class_weights: torch.Tensor, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.router, self.lr, self.weight_decay = router, lr, weight_decay
        self.loss = nn.CrossEntropyLoss(weight=class_weights)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self.router(x), y)
        self.log("router/loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.router.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def train_router(model: nn.Module, tokenizer, tasks: list[str], per_task: int = 200, held_out: int = 200,
                 epochs: int = 60, lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0,
                 enable_progress_bar: bool = True) -> tuple[TaskRouter, dict]:
    """Train a router on the tasks' calibration prompts; report accuracy and per-task P/R/F1 on held-out ones.

    ``tasks``: single tasks or lm-eval groups (``mmlu``: prompts of all its subjects). ``per_task`` /
    ``held_out``: prompts per task drawn (seeded) from the calibration / evaluation split (0 = all).
    """
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

    from prunekit.tasks import leaf_tasks, prompts

    gen = torch.Generator().manual_seed(seed)

    def draw(task: str, split: str, count: int) -> list[str]:
        texts = [t for leaf in leaf_tasks([task]) for t in prompts(leaf, split, answered=False)]
        order = torch.randperm(len(texts), generator=gen).tolist()
        return [texts[i] for i in order[: count or len(texts)]]

    train = {t: draw(t, "calibration", per_task) for t in tasks}
    test = {t: draw(t, "evaluation", held_out) for t in tasks}
    x = prompt_features(model, tokenizer, [p for t in tasks for p in train[t]])
    y = torch.tensor([i for i, t in enumerate(tasks) for _ in train[t]])
    router = TaskRouter(tasks, x.shape[1])
    router.mean.copy_(x.mean(0))
    router.std.copy_(x.std(0).clamp_min(1e-6))
    counts = torch.bincount(y, minlength=len(tasks)).double()
    weights = (counts.sum() / (len(tasks) * counts)).float()  # balanced classes
    pl.seed_everything(seed, verbose=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=enable_progress_bar, deterministic=True)
    trainer.fit(_RouterModule(router, weights, lr, weight_decay), loader)
    router.eval()
    xt = prompt_features(model, tokenizer, [p for t in tasks for p in test[t]])
    yt = torch.tensor([i for i, t in enumerate(tasks) for _ in test[t]])
    with torch.no_grad():
        pred = router(xt).argmax(1)
    k = len(tasks)
    per = {name: metric(num_classes=k, average="none")(pred, yt).tolist()
           for name, metric in (("precision", MulticlassPrecision), ("recall", MulticlassRecall), ("f1", MulticlassF1Score))}
    report = {"accuracy": float(MulticlassAccuracy(num_classes=k, average="micro")(pred, yt)),
              "macro_f1": float(MulticlassF1Score(num_classes=k, average="macro")(pred, yt)),
              "chance": 1 / k,
              "per_task": {t: {"precision": per["precision"][i], "recall": per["recall"][i], "f1": per["f1"][i],
                               "train": len(train[t]), "held_out": len(test[t])} for i, t in enumerate(tasks)}}
    return router, report
