"""Few-shot pieces of the LFT application: episodes, digit domains, image-folder domains, metric heads, the episode
metric, and LFT meta-training on episodes under MetaTrainer."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from metatrain.data import EpisodeDataset, PooledDomains, load_digit_domains, load_image_folder_domain
from metatrain.experiments import episode_accuracy, evaluate_episodes, paired_differences
from metatrain.models import (
    FewShotClassifier,
    MatchingNetHead,
    ProtoNetHead,
    RelationNetHead,
    build_fewshot_model,
    class_means,
)
from metatrain.trainer import MetaTrainerCallback


@pytest.fixture(scope="module")
def digit_domains():
    return load_digit_domains(seen=["gray", "inverted", "noisy"], unseen=["low_contrast"], image_size=8)


# -------------------------------------------------------------------------------------------------------- data
def test_digit_domains_split_the_digits_and_differ_in_style(digit_domains):
    seen, unseen = digit_domains["seen"], digit_domains["unseen"]
    assert set(seen) == {"gray", "inverted", "noisy"} and set(unseen) == {"low_contrast"}
    assert {len(ds) for ds in seen.values()} == {1257} and len(unseen["low_contrast"]) == 540  # 1,797 digits
    gray, inverted = seen["gray"][:]["pixel_values"], seen["inverted"][:]["pixel_values"]
    assert gray.shape == (1257, 3, 8, 8) and gray.dtype == torch.float32
    assert torch.equal(seen["gray"][:]["labels"], seen["inverted"][:]["labels"])  # same digits, other rendering
    assert torch.corrcoef(torch.stack([gray.flatten(), inverted.flatten()]))[0, 1] < -0.9
    low = unseen["low_contrast"][:]["pixel_values"]
    assert low.std() < 0.5 * gray.std()
    with pytest.raises(ValueError, match=r"Unknown digit domains \['sepia'\]"):
        load_digit_domains(seen=["gray", "sepia"])
    with pytest.raises(ValueError, match=r"\['gray'\] are both seen and unseen"):
        load_digit_domains(seen=["gray"], unseen=["gray"])


def test_episodes_are_deterministic_n_way_k_shot_from_one_domain(digit_domains):
    seen = digit_domains["seen"]
    episodes = EpisodeDataset(seen, n_way=5, k_shot=3, n_query=4, num_episodes=20, seed=7)
    first = episodes[3]
    assert first["support"].shape == (15, 3, 8, 8) and first["query"].shape == (20, 3, 8, 8)
    assert first["support_labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert first["labels"].tolist() == [c for c in range(5) for _ in range(4)]
    again = EpisodeDataset(seen, n_way=5, k_shot=3, n_query=4, num_episodes=20, seed=7)[3]
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = EpisodeDataset(seen, n_way=5, k_shot=3, n_query=4, num_episodes=20, seed=8)[3]
    assert not torch.equal(first["support"], other["support"])

    # every image of an episode is a distinct image of one domain, and each episode class is one digit
    domain = list(seen)[int(first["domain"])]
    pool = seen[domain][:]
    flat = pool["pixel_values"].flatten(1)
    images = torch.cat([first["support"], first["query"]]).flatten(1)
    matches = [torch.nonzero((flat == image).all(1)).flatten() for image in images]
    assert all(len(m) >= 1 for m in matches)
    rows = [int(m[0]) for m in matches]
    assert len(set(rows)) == len(rows)
    digits = pool["labels"][rows]
    episode_labels = torch.cat([first["support_labels"], first["labels"]])
    for c in range(5):
        assert len(set(digits[episode_labels == c].tolist())) == 1
    assert len(set(digits.tolist())) == 5
    assert len({int(episodes[i]["domain"]) for i in range(20)}) == 3  # all domains are drawn


def test_episode_dataset_errors(digit_domains):
    seen = digit_domains["seen"]
    with pytest.raises(ValueError, match="n_way=1"):
        EpisodeDataset(seen, n_way=1)
    with pytest.raises(ValueError, match="fewer than n_way=11"):
        EpisodeDataset(seen, n_way=11)
    with pytest.raises(ValueError, match="k_shot \\+ n_query = 500"):
        EpisodeDataset(seen, k_shot=250, n_query=250)
    with pytest.raises(ValueError, match="no id for domains \\['noisy'\\]"):
        EpisodeDataset(seen, domain_ids={"gray": 0, "inverted": 1})
    with pytest.raises(IndexError):
        EpisodeDataset(seen, num_episodes=2)[2]


def test_image_folder_domain_feeds_episodes(tmp_path, no_network):
    """The real loading path (`imagefolder`, one subfolder per class, as miniImageNet or CUB) on images the test
    writes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("albatross", "bunting", "cardinal"):
        folder = tmp_path / "birds" / name
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    domain = load_image_folder_domain(str(tmp_path / "birds"), image_size=12)
    assert domain.features["labels"].names == ["albatross", "bunting", "cardinal"]
    episode = EpisodeDataset({"birds": domain}, n_way=3, k_shot=1, n_query=2, num_episodes=2)[0]
    assert episode["support"].shape == (3, 3, 12, 12) and episode["query"].shape == (6, 3, 12, 12)
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder_domain(str(tmp_path / "cars"))


def test_pooled_domains_match_classes_by_name(digit_domains, tmp_path, no_network):
    """Pre-training data: the digit renderings share their ten classes; image folders with other class names add
    classes; a domain without named classes is refused."""
    from PIL import Image

    seen = digit_domains["seen"]
    pooled = PooledDomains(seen)
    assert len(pooled) == 3 * 1257 and pooled.classes == [str(d) for d in range(10)]
    for i, (name, j) in ((0, ("gray", 0)), (1257 + 5, ("inverted", 5)), (-1, ("noisy", 1256))):
        row, item = seen[name][j], pooled[i]
        assert torch.equal(item["pixel_values"], row["pixel_values"]) and item["labels"] == int(row["labels"])
    with pytest.raises(IndexError):
        pooled[len(pooled)]

    rng = np.random.default_rng(0)
    for domain, classes in (("birds", ("albatross", "bunting")), ("cars", ("audi", "bunting"))):
        for name in classes:
            (tmp_path / domain / name).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / domain / name / "0.png")
    folders = {d: load_image_folder_domain(str(tmp_path / d), image_size=6) for d in ("birds", "cars")}
    pooled = PooledDomains(folders)
    assert pooled.classes == ["albatross", "bunting", "audi"] and len(pooled) == 4
    assert [pooled[i]["labels"] for i in range(4)] == [0, 1, 2, 1] and pooled[3]["pixel_values"].shape == (3, 6, 6)
    with pytest.raises(ValueError, match="Domain 'plain' has no ClassLabel column 'labels'"):
        PooledDomains({"plain": seen["gray"].cast_column("labels", datasets.Value("int64"))})


# ------------------------------------------------------------------------------------------------------ heads
def test_protonet_logits_are_minus_squared_distances_to_class_means():
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(2, 6, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 0, 1, 1, 0]])
    logits = ProtoNetHead()(support, labels, query)
    assert logits.shape == (2, 5, 3)
    for e in range(2):
        for n in range(3):
            prototype = support[e][labels[e] == n].mean(0)
            torch.testing.assert_close(logits[e, :, n], -((query[e] - prototype) ** 2).sum(-1))
    maps = torch.randn(1, 6, 4, 2, 2, generator=g)
    torch.testing.assert_close(class_means(maps, labels[:1])[0, 2], maps[0, [2, 5]].mean(0))


def test_relation_net_scores_each_query_class_pair():
    torch.manual_seed(0)
    head = RelationNetHead(channels=4).eval()
    g = torch.Generator().manual_seed(1)
    support, query = torch.randn(1, 4, 4, 2, 2, generator=g), torch.randn(1, 3, 4, 2, 2, generator=g)
    labels = torch.tensor([[0, 1, 0, 1]])
    scores = head(support, labels, query)
    assert scores.shape == (1, 3, 2)
    prototypes = class_means(support, labels)[0]
    for q in range(3):
        for n in range(2):
            pair = torch.cat([prototypes[n], query[0, q]])[None]
            torch.testing.assert_close(scores[0, q, n], head.relation(pair)[0, 0])
    with pytest.raises(ValueError, match="feature maps"):
        head(support.flatten(2), labels, query.flatten(2))


def test_matching_net_attends_over_the_support_set():
    """Without FCE: log of the cosine-attention mass on each class (checked by loops); with FCE, the attention LSTM
    refines each query against its own episode's support only (batched = episode by episode, and = a loop over the
    support steps), and the output are log-probabilities."""
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(2, 4, 3, generator=g), torch.randn(2, 3, 3, generator=g)
    labels = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]])
    plain = MatchingNetHead(3, fce=False)
    assert not list(plain.parameters())
    logits = plain(support, labels, query)
    for e in range(2):
        for q in range(3):
            cosine = torch.nn.functional.cosine_similarity(query[e, q][None], support[e], dim=-1)
            attention = torch.softmax(100 * cosine.clamp(min=0), dim=0)
            for n in range(2):
                expected = (attention[labels[e] == n].sum() + 1e-6).log()
                torch.testing.assert_close(logits[e, q, n], expected, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    head = MatchingNetHead(3)
    out = head(support, labels, query)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(head(support[1:], labels[1:], query[1:]), out[1:])
    g_support = head.embed_support(support)
    f, read_dim = query[0, 0][None], support.shape[-1]
    h, c = f, torch.zeros_like(f)
    for _ in range(4):  # one step per support example
        attention = torch.softmax(h @ g_support[0].T, dim=-1)
        h, c = head.query_encoder(torch.cat([f, attention @ g_support[0]], dim=-1), (h, c))
        h = h + f
    assert h.shape[-1] == read_dim
    torch.testing.assert_close(head.embed_query(query, g_support)[0, 0], h[0])


@pytest.mark.parametrize("head", ["protonet", "relationnet", "matchingnet"])
def test_few_shot_classifier_on_one_episode_or_a_batch(head):
    torch.manual_seed(0)
    model = build_fewshot_model("test_resnet", head, in_chans=1).eval()
    assert isinstance(model, FewShotClassifier)
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(2, 6, 1, 16, 16, generator=g), torch.randn(2, 4, 1, 16, 16, generator=g)
    labels = torch.tensor([0, 1, 2] * 2).repeat(2, 1)
    batched = model(support, labels, query)
    assert batched.shape == (2, 4, 3)
    torch.testing.assert_close(model(support[1], labels[1], query[1])[0], batched[1])
    with pytest.raises(ValueError, match="Unknown few-shot head 'matching'"):
        build_fewshot_model("test_resnet", "matching")
    with pytest.raises(ValueError, match="Unknown backbone 'resnet-10'"):
        build_fewshot_model("resnet-10")


def test_paired_differences_against_a_baseline_by_seed():
    """Differences are taken seed by seed: a seed that lowers every method alike leaves them unchanged, and the
    interval is the t interval of their mean (checked by hand for n = 3: t(0.975, 2) = 4.3027)."""
    base = {0: 0.60, 1: 0.40, 2: 0.55}
    gains = {0: 0.02, 1: 0.03, 2: 0.04}
    runs = [{"method": "no_ft", "seed": s, "acc": a} for s, a in base.items()]
    runs += [{"method": "lft", "seed": s, "acc": base[s] + gains[s]} for s in (2, 0, 1)]
    runs += [{"method": "other", "seed": 0, "acc": 0.5}, {"method": "other", "seed": 1, "acc": None}]
    report = paired_differences(runs, "no_ft", ["acc"])
    lft = report["lft"]["acc"]
    assert lft["n"] == 3 and lft["positive"] == 3
    assert lft["mean"] == pytest.approx(0.03) and lft["std"] == pytest.approx(0.01)
    assert lft["ci95"] == pytest.approx(4.3027 * 0.01 / np.sqrt(3), rel=1e-4)
    assert report["other"]["acc"] == {"mean": pytest.approx(-0.1), "std": None, "ci95": None, "n": 1, "positive": 0}
    with pytest.raises(ValueError, match=r"baseline 'no-ft'.*\['no_ft', 'lft', 'other'\]"):  # a typo, not n = 0
        paired_differences(runs, "no-ft", ["acc"])


def test_episode_accuracy_and_its_confidence_interval():
    logits = np.zeros((4, 2, 3))
    logits[..., 0] = 1.0  # always predicts class 0
    labels = np.array([[0, 0], [0, 1], [1, 1], [0, 0]])  # per episode: 1, 0.5, 0, 1
    metrics = episode_accuracy((logits, labels))
    per_episode = np.array([1.0, 0.5, 0.0, 1.0])
    assert metrics["accuracy"] == pytest.approx(0.625) and metrics["episodes"] == 4
    assert metrics["accuracy_ci95"] == pytest.approx(1.96 * per_episode.std() / 2)


# ------------------------------------------------------------------------------------------ LFT on episodes
def lft_episode_trainer(tmp_path, seen, k_shot, train_episodes, meta_episodes, head="protonet", **overrides):
    """A few-shot `test_resnet` with FT layers attached under `MetaTrainer`: pseudo-seen training episodes and
    pseudo-unseen meta episodes over the same domain ids, meta batches from another domain."""
    from metatrain import MetaTrainer, MetaTrainingArguments
    from metatrain.modules import attach_feature_wise_transforms

    shape = dict(n_way=3, k_shot=k_shot, n_query=2, domain_ids={name: i for i, name in enumerate(seen)})
    train = EpisodeDataset(seen, num_episodes=train_episodes, seed=0, **shape)
    meta = EpisodeDataset(seen, num_episodes=meta_episodes, seed=1, **shape)
    torch.manual_seed(0)
    model = build_fewshot_model("test_resnet", head)
    transforms = attach_feature_wise_transforms(model.backbone)
    compute_metrics = overrides.pop("compute_metrics", None)
    args = MetaTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], logging_steps=1, per_device_train_batch_size=1,
        meta_batch_size=1, meta_disjoint_key="domain", disable_tqdm=True, save_strategy="no", **overrides,
    )  # fmt: skip
    trainer = MetaTrainer(
        model=model, args=args, train_dataset=train, meta_dataset=meta, meta_module=transforms,
        model_input_names=["support", "support_labels", "query"], compute_metrics=compute_metrics,
    )  # fmt: skip
    return trainer, transforms


def test_lft_meta_trains_on_episodes_from_another_domain(tmp_path, digit_domains):
    """Pseudo-seen episodes train the model with FT on; pseudo-unseen episodes from another seen domain, FT off, give
    the meta loss; both optimizers step their own parameters and the test episodes are scored per episode."""
    trainer, transforms = lft_episode_trainer(
        tmp_path, digit_domains["seen"], k_shot=2, train_episodes=8, meta_episodes=8, max_steps=3, learning_rate=1e-3,
        optim="adamw_torch", weight_decay=0.0, hypergradient="evograd", compute_metrics=episode_accuracy,
        hypergradient_kwargs={"sigma": "lr", "temperature": 1.0, "memory_lean": True},
    )  # fmt: skip
    # temperature 1: on this untrained net (gradient norm ~1,500) the two copies' losses differ by up to 4.4, so at
    # the default 0.05 the softmax is one-hot and, for some noise draws, the hypergradient underflows to exactly zero
    pairs = []

    class Recording(MetaTrainerCallback):
        def on_meta_step(self, args, state, control, *, problem, **kwargs):
            pairs.append((int(problem.train_batch["domain"]), int(problem.meta_batch["domain"])))

    trainer.add_callback(Recording())
    before = {k: v.clone() for k, v in transforms.state_dict().items()}
    trainer.train()
    assert len(pairs) == 3 and all(a != b for a, b in pairs)
    assert any(not torch.equal(before[k], v) for k, v in transforms.state_dict().items())
    assert all(e["hypergradient_norm"] > 0 for e in trainer.state.log_history if "hypergradient_norm" in e)
    test = EpisodeDataset(digit_domains["unseen"], n_way=3, k_shot=1, n_query=3, num_episodes=5, seed=2)
    metrics = trainer.evaluate(test, metric_key_prefix="test")
    assert metrics["test_episodes"] == 5 and 0 <= metrics["test_accuracy"] <= 1 and metrics["test_accuracy_ci95"] >= 0
    # features cached once per image give the same scores as embedding every episode
    trainer.model.train()
    cached = evaluate_episodes(trainer.model, test, batch_size=100, episodes_per_batch=2)
    assert cached["episodes"] == 5
    assert cached["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert cached["accuracy_ci95"] == pytest.approx(metrics["test_accuracy_ci95"])
    assert trainer.model.training  # the mode is restored


@pytest.mark.parametrize(
    "estimator, options",
    # the Neumann series diverges at alpha = lr on this loss (gradient norm ~2,000): the meta step is then skipped
    [("first_order", {}), ("t1t2", {}), ("t1t2_fd", {}), ("neumann", {"terms": 3, "alpha": 1e-5}), ("reverse", {}),
     ("hyperdistill", {})],
)  # fmt: skip
def test_every_estimator_meta_trains_lft_on_episodes(tmp_path, digit_domains, estimator, options):
    """The episodic LFT setup (embedded FT layers, meta loss with FT off, meta episodes from another domain) with each
    of the other estimators (EvoGrad above): two meta steps, finite, none skipped, FT layers moved (except
    `first_order`, whose direct term is zero here: the meta loss does not see the FT layers)."""
    trainer, transforms = lft_episode_trainer(
        tmp_path, digit_domains["seen"], k_shot=1, train_episodes=4, meta_episodes=12, max_steps=2,
        learning_rate=0.01, hypergradient=estimator, hypergradient_kwargs=options,
        meta_optimizer_kwargs={"weight_decay": 0.0},
    )  # fmt: skip
    before = {k: v.clone() for k, v in transforms.state_dict().items()}
    trainer.train()
    logs = [e for e in trainer.state.log_history if "hypergradient_norm" in e]
    assert len(logs) == 2 and trainer.meta_steps_skipped == 0
    assert all(np.isfinite(e["meta_loss"]) and np.isfinite(e["hypergradient_norm"]) for e in logs)
    moved = any(not torch.equal(before[k], v) for k, v in transforms.state_dict().items())
    assert moved == (estimator != "first_order")


@pytest.mark.parametrize("head", ["relationnet", "matchingnet"])
def test_lft_meta_trains_with_the_other_heads(tmp_path, digit_domains, head):
    """T1-T2 differentiates the lookahead through the head too (the relation module's batch norms, MatchingNet's
    LSTMs): two meta steps, finite, the FT layers moved."""
    trainer, transforms = lft_episode_trainer(
        tmp_path, digit_domains["seen"], k_shot=2, train_episodes=4, meta_episodes=12, max_steps=2, head=head,
        learning_rate=0.01, hypergradient="t1t2", meta_optimizer_kwargs={"weight_decay": 0.0},
    )  # fmt: skip
    before = {k: v.clone() for k, v in transforms.state_dict().items()}
    trainer.train()
    logs = [e for e in trainer.state.log_history if "hypergradient_norm" in e]
    assert len(logs) == 2 and trainer.meta_steps_skipped == 0
    assert all(np.isfinite(e["meta_loss"]) and e["hypergradient_norm"] > 0 for e in logs)
    assert any(not torch.equal(before[k], v) for k, v in transforms.state_dict().items())
