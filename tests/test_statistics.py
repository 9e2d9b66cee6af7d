"""`MetaStatistics` (`metatrain.statistics`): the sums over meta steps MetaTrainer keeps, their means and training-log
entries, the agreement with a reference estimator (an undefined cosine counted apart), and the checkpointed state."""

from __future__ import annotations

import dataclasses
import math

from metatrain.statistics import MetaStatistics


def test_add_step_and_add_memory_sum_and_means_divide_by_their_own_counts():
    statistics = MetaStatistics()
    assert statistics.means() == {
        "meta_loss": None, "hypergradient_norm": None, "meta_step_seconds": None, "meta_step_memory_mb": None
    }  # fmt: skip
    statistics.add_step(1.0, 2.0, 0.5)
    statistics.add_step(3.0, 6.0, 1.5)
    statistics.add_step(5.0, 1.0, 1.0)
    statistics.add_memory(10.0)  # memory measured at one step of the three
    assert (statistics.steps, statistics.meta_loss, statistics.hypergradient_norm) == (3, 9.0, 9.0)
    assert (statistics.seconds, statistics.memory_mb, statistics.memory_steps) == (3.0, 10.0, 1)
    assert statistics.means() == {
        "meta_loss": 3.0, "hypergradient_norm": 3.0, "meta_step_seconds": 1.0, "meta_step_memory_mb": 10.0
    }  # fmt: skip
    statistics.skipped += 1  # a skipped step is counted apart: the means are those of the applied steps
    assert statistics.means()["meta_loss"] == 3.0


def test_logs_are_the_rounded_means_of_what_was_counted_only():
    statistics = MetaStatistics()
    assert statistics.logs("t1t2") == {}
    statistics.skipped = 2
    assert statistics.logs("t1t2") == {}  # only skipped steps: nothing to average
    statistics.add_step(1 / 3, 1 / 3, 1 / 7)
    assert statistics.logs("t1t2") == {
        "meta_loss": 0.333333, "hypergradient_norm": 1 / 3, "meta_step_seconds": 0.142857
    }  # fmt: skip
    statistics.add_memory(2 / 3)
    assert statistics.logs("t1t2")["meta_step_memory_mb"] == 0.6667
    assert not any("cosine" in key or "ratio" in key for key in statistics.logs("t1t2"))


def test_a_nan_cosine_is_counted_apart_and_left_out_of_the_mean():
    """A zero or non-finite hypergradient has no direction: its cosine is NaN, counted in
    `hypergradient_cosine_undefined_steps`, never averaged in (as 0, or as a perfect 1)."""
    statistics = MetaStatistics()
    statistics.add_agreement(0.5, 2.0)
    statistics.add_agreement(math.nan, 0.0)  # a zero estimate: no cosine, a norm ratio of 0
    statistics.add_agreement(math.nan, math.nan)  # a skipped step: neither
    statistics.add_agreement(1.0, 1.0)
    assert (statistics.compared, statistics.cosine_undefined, statistics.norm_ratios) == (4, 2, 3)
    logs = statistics.logs("t1t2_fd")
    assert logs == {
        "hypergradient_cosine_to_t1t2_fd": 0.75,
        "hypergradient_norm_ratio_to_t1t2_fd": 1.0,
        "hypergradient_cosine_undefined_steps": 2,
    }
    undefined = MetaStatistics()
    undefined.add_agreement(math.nan, math.nan)
    logs = undefined.logs("t1t2")
    assert math.isnan(logs["hypergradient_cosine_to_t1t2"]) and math.isnan(logs["hypergradient_norm_ratio_to_t1t2"])
    assert logs["hypergradient_cosine_undefined_steps"] == 1


def test_state_dict_round_trip_restores_every_sum_and_count():
    statistics = MetaStatistics(skipped=1)
    statistics.add_step(0.7, 0.2, 0.01)
    statistics.add_memory(12.5)
    statistics.add_agreement(0.9, 1.1)
    statistics.add_agreement(math.nan, math.nan)
    state = statistics.state_dict()
    assert set(state) == {field.name for field in dataclasses.fields(MetaStatistics)}
    restored = MetaStatistics()
    restored.load_state_dict(state)
    assert restored == statistics and restored.logs("t1t2") == statistics.logs("t1t2")
    statistics.add_step(1.0, 1.0, 1.0)  # the state is a copy: later steps do not change it
    assert state["steps"] == 1 and restored.steps == 1
    assert (restored.skipped, restored.cosine_undefined, restored.memory_steps) == (1, 1, 1)
