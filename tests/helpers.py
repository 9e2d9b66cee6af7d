"""Builders the test modules share: small image data sets and models, MetaTrainer's arguments and a trainer on them, a
tiny BERT and its tokenizer, a user's estimator and a recording callback, the small problems with known answers of
the estimator tests, and a float64 `MetaObjective` with a loss weighter."""

from __future__ import annotations

import datasets
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from transformers import TrainerCallback

from metatrain import MetaTrainer, MetaTrainingArguments
from metatrain.estimators import HypergradientEstimator, HypergradientResult, create_estimator
from metatrain.estimators.functional import grads_or_zeros, sgd_lookahead
from metatrain.modules import MetaWeightNet
from metatrain.objective import MetaObjective
from metatrain.trainer import MetaTrainerCallback


# ------------------------------------------------------------------------------------- images, models and MetaTrainer
def image_dataset(n: int, seed: int, nan: bool = False) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    if nan:
        x[:] = float("nan")
    y = torch.randint(0, 3, (n,), generator=g)
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()}).with_format("torch")


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    )  # fmt: skip


def make_args(tmp_path, **overrides) -> MetaTrainingArguments:
    options = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=0.1,
        logging_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    options.update(overrides)
    return MetaTrainingArguments(**options)


def make_trainer(
    tmp_path,
    model=None,
    meta_module=None,
    meta_nan=False,
    estimator=None,
    callbacks=None,
    eval_dataset=None,
    **overrides,
) -> MetaTrainer:
    torch.manual_seed(1)
    return MetaTrainer(
        model=model if model is not None else bn_model(),
        args=make_args(tmp_path, **overrides),
        train_dataset=image_dataset(64, seed=1),
        eval_dataset=eval_dataset,
        meta_dataset=image_dataset(20, seed=2, nan=meta_nan),
        meta_module=meta_module if meta_module is not None else MetaWeightNet(),
        estimator=estimator,
        callbacks=callbacks,
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------- text: a tokenizer written here and a tiny BERT
WORDS = "the a cat dog sat ran on mat far away quickly slowly red blue big small".split()


def tiny_tokenizer(tmp_path, padding_side: str = "right"):
    """A BERT WordPiece tokenizer from a vocabulary file written here (no download)."""
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), padding_side=padding_side)


def tokenized_text_dataset(tokenizer, n: int, seed: int) -> datasets.Dataset:
    """Sentences of 1 to 12 words, tokenized without padding (the collator pads each batch to its longest)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 13, (n,), generator=g).tolist()
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist()) for k in lengths]
    data = datasets.Dataset.from_dict({"text": texts, "labels": torch.randint(0, 3, (n,), generator=g).tolist()})
    return data.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])


def tiny_bert(vocab_size: int, num_labels: int = 3, hidden_dropout: float = 0.0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=num_labels, max_position_embeddings=32,
                        hidden_dropout_prob=hidden_dropout, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertForSequenceClassification(config)


# ----------------------------------------------------------------- a user's estimator and a callback on the meta step
class OneStepLookahead(HypergradientEstimator):
    """A user's estimator, outside the package, from the public pieces: T1-T2 written again."""

    name = "one_step_lookahead"
    second_order = True

    def estimate(self, problem):
        stepped = sgd_lookahead(problem.params, problem.train_loss, problem.train_batch, problem.lr, create_graph=True)
        loss = problem.meta_loss(stepped, problem.meta_batch)
        return HypergradientResult(grads_or_zeros(loss, problem.meta_params), loss.detach())


class Recorder(MetaTrainerCallback):
    """Records every meta step, and T1-T2's estimate of the event's problem at that moment."""

    def __init__(self):
        self.events = []

    def on_meta_step(self, args, state, control, *, trainer, problem, result, hypergradient_norm, skipped, **kwargs):
        again = create_estimator("t1t2").estimate(problem) if not skipped else None
        self.events.append((state.global_step, again, result, hypergradient_norm, skipped, problem))


# --------------------------------------------------------------------- small problems with known answers (estimators)
def closed_form_hypergradient(lam: float) -> float:
    """d/d lambda of (x*(lambda) - 0.5)^2 with x*(lambda) = argmin (x - 1)^2 + lambda x^2 = 1 / (1 + lambda)."""
    return (lam - 1) / (lam + 1) ** 3


def one_dim_problem(lam):
    train_loss = lambda p, batch: (p["x"] - 1) ** 2 + lam * p["x"] ** 2  # noqa: E731
    meta_loss = lambda p, batch: (p["x"] - 0.5) ** 2  # noqa: E731
    return train_loss, meta_loss


class WeightedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def weighted_mlp_problem(seed: int = 0, n: int = 24):
    """A float64 MLP whose training loss weights each example by `sigmoid(lambda_i)`: `(params, lam, losses)`."""
    torch.manual_seed(seed)
    model = WeightedMLP().double()
    xb, yb = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    xm, ym = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    lam = (0.3 * torch.randn(n, dtype=torch.float64)).requires_grad_()

    def train_loss(p, batch):
        x, y = batch if batch is not None else (xb, yb)
        ce = nn.functional.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")
        return (torch.sigmoid(lam[: len(y)]) * ce).mean()

    def meta_loss(p, batch):
        return nn.functional.cross_entropy(functional_call(model, p, (xm,)), ym)

    params = {name: p.detach() for name, p in model.named_parameters()}
    return params, lam, train_loss, meta_loss


# ------------------------------------------------------------------------------- a MetaObjective with a loss weighter
LR = 0.3


def per_sample_ce64(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example in the logits' dtype (the default loss computes in float32)."""
    return F.cross_entropy(logits, labels, reduction="none")


def tiny_objective(model: nn.Module | None = None, per_sample_loss=per_sample_ce64) -> tuple[MetaObjective, tuple]:
    """A float64 MLP classifier with a Meta-Weight-Net, and a training and a meta batch of 16 whose per-sample losses
    spread out."""
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    weighter = MetaWeightNet(hidden_size=16).double()
    objective = MetaObjective(model, weighter, per_sample_loss=per_sample_loss)
    train_batch = (3 * torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    meta_batch = (3 * torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    return objective, (train_batch, meta_batch)


def shifted(params, by: float = 0.05) -> dict[str, torch.Tensor]:
    """The weights moved off `params`, by a fixed pattern (no random draws)."""
    return {
        name: p + by * torch.linspace(-1, 1, p.numel(), dtype=p.dtype).reshape(p.shape) for name, p in params.items()
    }


def held_loss_by_hand(objective: MetaObjective, weights, at, batch) -> torch.Tensor:
    """The weighted training loss at `weights`, the weighter fed the per-sample losses at `at`."""
    losses, weighter_input = objective.per_sample(weights, batch), objective.per_sample(at, batch)
    w = objective.meta_module(weighter_input)
    return (w * losses).sum() / w.sum()


# ------------------------------------------------------------------------------------------------------------ modules
def forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class Scale(nn.Module):
    """An embedded meta-module: a learnable per-feature scale, attached with a forward hook."""

    def __init__(self, features: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(features))

    def forward(self, module, inputs, output):
        return output * self.log_scale.exp()


class StopAfter(TrainerCallback):
    """Stops training after optimizer step `step` and saves a checkpoint there: an interrupted run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True
