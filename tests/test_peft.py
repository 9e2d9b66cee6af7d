"""LoRA adapters (`peft`) on a tiny BERT built from a config: MetaTrainer reads the text batches, the meta step
perturbs and differentiates only the trainable adapter weights (the frozen base never changes), T1-T2 on the adapters
equals the one-step lookahead written out by hand, and a resumed run is the same run."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from helpers import StopAfter, make_args
from peft import LoraConfig, get_peft_model
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import BertConfig, BertForSequenceClassification

from metatrain import MetaTrainer
from metatrain.modules import MetaWeightNet
from metatrain.trainer import MetaTrainerCallback


def text_dataset(n: int, seed: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, 12), generator=g)
    columns = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] > 50).long()}
    return datasets.Dataset.from_dict({k: v.numpy() for k, v in columns.items()}).with_format("torch")


def lora_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    model = get_peft_model(BertForSequenceClassification(config), lora)
    for name, p in model.named_parameters():  # LoRA's B starts at zero: move it so that every adapter weight acts
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    return model


def lora_trainer(tmp_path, hypergradient: str = "evograd", callbacks=None, **overrides) -> MetaTrainer:
    args = make_args(tmp_path, hypergradient=hypergradient, learning_rate=0.05, **overrides)
    torch.manual_seed(3)
    return MetaTrainer(
        model=lora_bert(), args=args, train_dataset=text_dataset(64, 1), meta_dataset=text_dataset(32, 2),
        meta_module=MetaWeightNet(hidden_size=8), callbacks=callbacks,
    )  # fmt: skip


class Capture(MetaTrainerCallback):
    def __init__(self):
        self.steps = []

    def on_meta_step(self, args, state, control, *, trainer, problem, result, **kwargs):
        # the weights as the meta step saw them (problem.params are views of the model's, which train on)
        weights = {n: p.detach().clone() for n, p in problem.params.items()}
        meta = [p.detach().clone() for p in trainer.meta_params]
        self.steps.append((problem, weights, [g.detach().clone() for g in result.grads], meta))


def frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("hypergradient", ["evograd", "t1t2_fd", "first_order"])
def test_lora_model_trains_and_only_its_adapters_are_perturbed(tmp_path, hypergradient):
    capture = Capture()
    trainer = lora_trainer(tmp_path, hypergradient, callbacks=[capture])
    base, adapters = frozen(trainer.model), {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    meta_start = [p.detach().clone() for p in trainer.meta_params]
    trainer.train()
    assert len(capture.steps) == 4
    for problem, _, grads, _ in capture.steps:
        assert set(problem.params) == adapters  # LoRA's and the classification head peft trains (modules_to_save)
        assert all("lora_" in n or "modules_to_save" in n for n in adapters)
        assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(v, frozen(trainer.model)[n]) for n, v in base.items())
    assert all(not torch.equal(p, start[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    if hypergradient != "first_order":  # Meta-Weight-Net has no direct gradient: first-order gives zero
        assert any(not torch.equal(a, b) for a, b in zip(meta_start, trainer.meta_params))


def test_t1t2_on_adapters_equals_the_lookahead_written_out(tmp_path):
    """`d L_val(w - lr d L_train(w, lambda) / dw) / d lambda` over the adapter weights `w`, with the weighted loss
    `sum(v l) / sum(v)` of Meta-Weight-Net's weights `v`, by autograd on the peft model directly."""
    capture = Capture()
    trainer = lora_trainer(tmp_path, "t1t2", callbacks=[capture], max_steps=2)
    trainer.train()
    model, net = trainer.model, MetaWeightNet(hidden_size=8)
    for problem, weights, grads, meta in capture.steps:
        lam = [m.clone().requires_grad_(True) for m in meta]
        names = [n for n, _ in net.named_parameters()]

        def losses(weights, batch):
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
                logits = functional_call(model, weights, (), inputs).logits
            return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")

        w = {n: p.clone().requires_grad_(True) for n, p in weights.items()}
        train = losses(w, problem.train_batch)
        v = functional_call(net, dict(zip(names, lam)), (train.detach(),))
        g = torch.autograd.grad((v * train).sum() / v.sum(), list(w.values()), create_graph=True)
        lookahead = {n: p - problem.lr * d for (n, p), d in zip(w.items(), g)}
        expected = torch.autograd.grad(losses(lookahead, problem.meta_batch).mean(), lam)
        assert max(float(e.abs().max()) for e in expected) > 1e-6
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)


def test_lora_run_resumed_from_a_checkpoint_is_the_same_run(tmp_path):
    """Interrupted after step 2 of 4 (the learning rate decays over the 4 steps), then resumed."""
    full = lora_trainer(tmp_path / "full")
    full.train()
    first = lora_trainer(tmp_path / "resumed", callbacks=[StopAfter(2)])
    first.train()
    resumed = lora_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-2"))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(full.meta_params, resumed.meta_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert np.isfinite(full.state.log_history[-1]["train_loss"])
