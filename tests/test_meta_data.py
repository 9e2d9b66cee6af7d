"""The meta batches (`metatrain.meta_data`): the epoch-seeded sampler, resumable positions, and meta batches drawn
disjoint from the training batch in a key (LFT's pseudo-unseen domain)."""

from __future__ import annotations

import datasets
import pytest
import torch
from helpers import Recorder, bn_model, image_dataset, make_args

from metatrain import MetaTrainer
from metatrain.meta_data import EpochSeededSampler, MetaBatches
from metatrain.modules import MetaWeightNet


def domain_dataset(domains: list[int], seed: int) -> datasets.Dataset:
    data = image_dataset(len(domains), seed).with_format(None).add_column("domain", domains)
    return data.with_format("torch")


def test_meta_batches_come_from_another_domain(tmp_path):
    """`meta_disjoint_key`: LFT's pseudo-unseen episode comes from a domain the pseudo-seen one is not from."""
    args = make_args(tmp_path, meta_disjoint_key="domain", meta_batch_size=2, hypergradient="t1t2")
    train = domain_dataset([0] * 16 + [1] * 16, seed=1)
    meta = domain_dataset([0, 0, 1, 1, 2, 2] * 2, seed=2)
    trainer = MetaTrainer(model=bn_model(), args=args, train_dataset=train, meta_dataset=meta,
                          meta_module=MetaWeightNet())  # fmt: skip
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    pairs = [(set(p.train_batch["domain"].tolist()), set(p.meta_batch["domain"].tolist())) for _, _, _, _, _, p in
             recorder.events]  # fmt: skip
    assert "domain" in train.column_names and len(pairs) == 4
    assert all(not train_domains & meta_domains for train_domains, meta_domains in pairs)

    only_same = domain_dataset([0] * 8, seed=2)
    args = make_args(tmp_path, meta_disjoint_key="domain", meta_batch_size=2, meta_disjoint_max_draws=5)
    trainer = MetaTrainer(model=bn_model(), args=args, train_dataset=domain_dataset([0] * 16, seed=1),
                          meta_dataset=only_same, meta_module=MetaWeightNet())  # fmt: skip
    with pytest.raises(ValueError, match="No meta batch in 5 draws has a 'domain' other than"):
        trainer.train()
    args = make_args(tmp_path, meta_disjoint_key="language")
    trainer = MetaTrainer(model=bn_model(), args=args, train_dataset=train, meta_dataset=meta,
                          meta_module=MetaWeightNet())  # fmt: skip
    with pytest.raises(ValueError, match="meta_disjoint_key='language' is not a key of the training batch"):
        trainer.train()


# ------------------------------------------------------------------------------------- the sampler and the batches
def epoch_order(size: int, seed: int) -> list[int]:
    """The permutation `EpochSeededSampler` must give for `seed + epoch == seed`, drawn here independently."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


def toy_meta_batches(size: int = 10, batch_size: int = 4, seed: int = 0, loader=None) -> MetaBatches:
    """`size` integers in batches of `batch_size` (a last short one), shuffled by an `EpochSeededSampler`."""
    loader = loader or (lambda sampler: torch.utils.data.DataLoader(list(range(size)), batch_size, sampler=sampler))
    return MetaBatches(loader, EpochSeededSampler(size, seed))


def test_the_sampler_replays_any_epochs_permutation_and_leaves_the_global_rng():
    sampler = EpochSeededSampler(10, seed=3)
    state = torch.get_rng_state()
    first = list(sampler)
    assert len(sampler) == 10 and first == epoch_order(10, 3)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second == epoch_order(10, 4) and second != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert torch.equal(torch.get_rng_state(), state)


def test_meta_batches_are_drawn_pass_after_pass_in_each_epochs_order():
    """A pass ends with its short batch; the next pass starts in the next epoch's order. Drawing leaves the global
    RNG as it was, though a loader draws its base seed from it at the start of every pass."""
    batches = toy_meta_batches()
    assert batches.state_dict() == {"epoch": 0, "consumed": 0}
    state = torch.get_rng_state()
    drawn = [batches.next().tolist() for _ in range(7)]
    assert torch.equal(torch.get_rng_state(), state)
    orders = [epoch_order(10, epoch) for epoch in range(3)]
    expected = [part for order in orders for part in (order[:4], order[4:8], order[8:])][:7]
    assert drawn == expected
    assert batches.state_dict() == {"epoch": 2, "consumed": 1}


def test_a_restored_position_draws_the_batches_that_came_next():
    full = toy_meta_batches()
    drawn = [full.next().tolist() for _ in range(8)]
    resumed = toy_meta_batches()
    resumed.next()  # somewhere else first: loading the position must reset the pass being drawn
    resumed.load_state_dict({"epoch": 1, "consumed": 2})  # after 5 draws: 3 in pass 0, 2 in pass 1
    assert [resumed.next().tolist() for _ in range(3)] == drawn[5:]
    assert resumed.state_dict() == full.state_dict() == {"epoch": 2, "consumed": 2}
    resumed.rewind()
    assert resumed.next().tolist() == drawn[0] and resumed.state_dict() == {"epoch": 0, "consumed": 1}


class EpochCountingLoader:
    """Stands in for Accelerate's loader: iterating it sets its sampler to its own count of passes, which starts at 0
    in a loader built after resume."""

    def __init__(self, data: list[int], sampler: EpochSeededSampler, batch_size: int):
        self.loader = torch.utils.data.DataLoader(data, batch_size, sampler=sampler)
        self.sampler, self.passes = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.passes = epoch

    def __iter__(self):
        self.sampler.set_epoch(self.passes)
        self.passes += 1
        return iter(self.loader)


def test_a_loader_that_counts_its_own_passes_is_set_to_the_restored_pass():
    batches = toy_meta_batches(loader=lambda sampler: EpochCountingLoader(list(range(10)), sampler, 4))
    batches.load_state_dict({"epoch": 2, "consumed": 1})
    assert batches.next().tolist() == epoch_order(10, 2)[4:8]
    assert [batches.next().tolist() for _ in range(2)] == [epoch_order(10, 2)[8:], epoch_order(10, 3)[:4]]


def test_next_for_skips_meta_batches_that_share_a_value_of_the_disjoint_key():
    rows = [{"domain": d, "x": float(i)} for i, d in enumerate([0, 0, 1, 1, 2, 2])]
    # in order, not shuffled: the batches are domains 0, 1, 2, then 0, 1, 2 again
    batches = MetaBatches(lambda sampler: torch.utils.data.DataLoader(rows, 2), EpochSeededSampler(6, 0))
    train = {"domain": torch.tensor([0, 1, 0])}
    assert batches.next_for(train, "domain")["domain"].tolist() == [2, 2]
    assert batches.state_dict() == {"epoch": 0, "consumed": 3}  # two refused draws, then the one returned
    assert batches.next_for({"domain": torch.tensor([0, 2])}, "domain")["domain"].tolist() == [1, 1]
    assert batches.next_for(train)["domain"].tolist() == [2, 2]  # no key: the next batch, whatever its domain
    with pytest.raises(ValueError, match="No meta batch in 4 draws has a 'domain' other than the training batch's"):
        batches.next_for({"domain": torch.tensor([0, 1, 2])}, "domain", max_draws=4)
    with pytest.raises(ValueError, match="meta_disjoint_key='language' is not a key of the training batch"):
        batches.next_for(train, "language")
