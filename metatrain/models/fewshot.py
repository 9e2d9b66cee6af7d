"""Metric-based few-shot classifiers: a backbone (e.g. a timm ResNet) and a ProtoNet, RelationNet or MatchingNet
head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import require


def class_means(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-episode class means of support features: `[E, S, *D]` with labels `[E, S]` in `0 .. N-1` gives
    `[E, N, *D]` (a one-hot matrix product: no Python loop, differentiable to any order)."""
    one_hot = F.one_hot(labels).to(features.dtype)  # [E, S, N]
    sums = torch.einsum("esn,es...->en...", one_hot, features)
    counts = one_hot.sum(1).view(*one_hot.shape[::2], *([1] * (features.dim() - 2)))
    return sums / counts


class ProtoNetHead(nn.Module):
    """Prototypical Networks (Snell et al., 2017): logits are minus the squared Euclidean distance from each query to
    each class mean of the support features (feature maps are averaged over space first). No parameters."""

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        if support.dim() > 3:
            support, query = support.flatten(3).mean(-1), query.flatten(3).mean(-1)
        prototypes = class_means(support, support_labels)  # [E, N, D]
        return -(query.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)


class RelationNetHead(nn.Module):
    """Relation Networks (Sung et al., 2018) in the softmax form LFT trains: a relation module scores the
    concatenation of each class mean feature map and each query feature map, and the scores are used as logits of a
    cross-entropy loss (instead of the original mean squared error).

    The relation module is two 3x3 conv-BN-ReLU blocks (`2C -> C -> C`, padded, so any feature-map size works),
    global average pooling and `Linear(C, hidden) - ReLU - Linear(hidden, 1)`. LFT's code (after "A Closer Look at
    Few-shot Classification") instead max-pools 2x2 after each block and flattens, which takes a ResNet's 7x7 map of
    224x224 images to 1x1 but cannot pool the 1x1 maps of the embedded default's 16x16 episodes.

    Args:
        channels (`int`): channels `C` of the backbone's feature maps.
        hidden (`int`, *optional*, defaults to 8): width of the relation module's hidden layer (8 in LFT's code).
    """

    def __init__(self, channels: int, hidden: int = 8):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.relation = nn.Sequential(
            *block(2 * channels, channels), *block(channels, channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1),
        )  # fmt: skip

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        if support.dim() != 5:
            raise ValueError(
                f"RelationNetHead needs feature maps [E, S, C, H, W], got features of shape {tuple(support.shape)}: "
                "use a backbone whose forward_features returns maps (timm ResNets do)."
            )
        prototypes = class_means(support, support_labels)  # [E, N, C, H, W]
        (episodes, ways), queries = prototypes.shape[:2], query.shape[1]
        pairs = torch.cat(
            [
                prototypes.unsqueeze(1).expand(-1, queries, -1, -1, -1, -1),
                query.unsqueeze(2).expand(-1, -1, ways, -1, -1, -1),
            ],
            dim=3,
        )  # [E, Q, N, 2C, H, W]
        return self.relation(pairs.flatten(0, 2)).view(episodes, queries, ways)


class MatchingNetHead(nn.Module):
    """Matching Networks (Vinyals et al., 2016) as LFT's code trains them (from Chen et al.'s "A Closer Look at
    Few-shot Classification"): pooled features, optionally with full context embeddings (FCE), scored by cosine
    attention over the support set.

    With `fce`, the support features `g` become `g + h_fwd + h_bwd` of a bidirectional LSTM over the support set, and
    each query feature `f` is refined by an attention LSTM run for as many steps as there are support examples
    (`h <- LSTMCell([f, a(h) G], (h, c)) + f`, `a` a softmax over `h . G`). The attention of a query over the support
    examples is `softmax(100 * relu(cos(f, g)))`, and the head returns `log(attention @ one_hot(labels) + 1e-6)`:
    log-probabilities, which cross-entropy accepts as logits (they are already normalized up to the 1e-6).

    Args:
        features (`int`): size `D` of the backbone's features (after global average pooling of feature maps).
        fce (`bool`, *optional*, defaults to `True`): use full context embeddings; without, plain cosine attention
            and no parameters.

    The support LSTM runs with cuDNN off, so that second-order estimators can differentiate through it on a GPU too
    (cuDNN's LSTM has no double backward); this is tested on CPU only.
    """

    def __init__(self, features: int, fce: bool = True):
        super().__init__()
        self.fce = fce
        if fce:
            self.support_encoder = nn.LSTM(features, features, batch_first=True, bidirectional=True)
            self.query_encoder = nn.LSTMCell(2 * features, features)

    def embed_support(self, support: torch.Tensor) -> torch.Tensor:
        """Support features `[E, S, D]` in the support set's context (the bidirectional LSTM, with `fce`)."""
        if not self.fce:
            return support
        # cuDNN's LSTM has no double backward (pytorch/pytorch#5261), which T1-T2 needs; the native one has
        with torch.backends.cudnn.flags(enabled=False):
            out = self.support_encoder(support)[0]  # [E, S, 2D]
        return support + out[..., : support.shape[-1]] + out[..., support.shape[-1] :]

    def embed_query(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Query features `[E, Q, D]` refined by attention over the embedded support `[E, S, D]` (with `fce`)."""
        if not self.fce:
            return query
        episodes, queries, dim = query.shape
        f = query.reshape(episodes * queries, dim)
        memory = support.repeat_interleave(queries, dim=0)  # [E*Q, S, D]: each query attends to its episode
        h, c = f, torch.zeros_like(f)
        for _ in range(support.shape[1]):
            attention = torch.softmax(torch.einsum("bd,bsd->bs", h, memory), dim=-1)
            read = torch.einsum("bs,bsd->bd", attention, memory)
            h, c = self.query_encoder(torch.cat([f, read], dim=-1), (h, c))
            h = h + f
        return h.view(episodes, queries, dim)

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        if support.dim() > 3:
            support, query = support.flatten(3).mean(-1), query.flatten(3).mean(-1)
        g = self.embed_support(support)
        f = self.embed_query(query, g)
        scores = 100 * F.relu(
            torch.einsum("eqd,esd->eqs", F.normalize(f, dim=-1, eps=1e-5), F.normalize(g, dim=-1, eps=1e-5))
        )
        one_hot = F.one_hot(support_labels).to(scores.dtype)  # [E, S, N]
        return (torch.einsum("eqs,esn->eqn", torch.softmax(scores, dim=-1), one_hot) + 1e-6).log()


class FewShotClassifier(nn.Module):
    """A backbone and a metric-based head that classifies the queries of an episode from its support set.

    `forward(support, support_labels, query)` takes one episode (`[S, C, H, W]`, `[S]`, `[Q, C, H, W]`) or a batch of
    `E` episodes (`[E, S, C, H, W]`, `[E, S]`, `[E, Q, C, H, W]`) and returns logits `[E, Q, N]` (`E = 1` for one
    episode), `N` being the number of classes of the support labels `0 .. N-1`. Support and query images go through
    the backbone in one batch, as in LFT's code, so batch norm sees the whole episode.

    The backbone is any module: its `forward_features` (timm models: the feature maps before pooling) is used when it
    has one, otherwise its `forward`. Meta-modules such as LFT's feature-wise transforms attach to the backbone.

    Args:
        backbone (`nn.Module`): the feature extractor.
        head (`nn.Module`): maps `(support_features, support_labels, query_features)` to logits, e.g.
            [`ProtoNetHead`], [`RelationNetHead`] or [`MatchingNetHead`].
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of a batch of images, `[B, ...]`: what the head compares."""
        return getattr(self.backbone, "forward_features", self.backbone)(images)

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        if support.dim() == 4:
            support, support_labels, query = support[None], support_labels[None], query[None]
        episodes, shots, queries = support.shape[0], support.shape[1], query.shape[1]
        features = self.embed(torch.cat([support.flatten(0, 1), query.flatten(0, 1)]))
        support_features = features[: episodes * shots].unflatten(0, (episodes, shots))
        query_features = features[episodes * shots :].unflatten(0, (episodes, queries))
        return self.head(support_features, support_labels, query_features)


FEWSHOT_HEADS = ("protonet", "relationnet", "matchingnet")


def build_fewshot_model(backbone: str, head: str = "protonet", in_chans: int = 3, **timm_kwargs) -> FewShotClassifier:
    """A [`FewShotClassifier`] on a freshly initialised timm backbone (never pretrained: nothing is downloaded).

    Args:
        backbone (`str`): a timm model name, e.g. `"resnet10t"` (LFT's ResNet-10), `"resnet18"`, `"resnet34"`,
            or `"test_resnet"` for tests.
        head (`str`, *optional*, defaults to `"protonet"`): `"protonet"`, `"relationnet"` or `"matchingnet"` (with
            full context embeddings).
        in_chans (`int`, *optional*, defaults to 3): channels of the input images.
        timm_kwargs: passed to `timm.create_model`. For timm ResNets `zero_init_last` defaults to `False` here:
            timm's default zeroes the last batch norm of each block, which blocks the hypergradient of an FT layer
            attached after it.
    """
    if head not in FEWSHOT_HEADS:
        raise ValueError(f"Unknown few-shot head {head!r}: choose one of {FEWSHOT_HEADS}.")
    timm = require("timm", "vision", "few-shot backbones (timm models)")
    if not timm.is_model(backbone):
        raise ValueError(f"Unknown backbone {backbone!r}: pass a timm model name such as 'resnet10t' or 'resnet34'.")
    if backbone in timm.list_models(module="resnet"):
        timm_kwargs.setdefault("zero_init_last", False)
    net = timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs)
    heads = {"protonet": ProtoNetHead, "relationnet": RelationNetHead, "matchingnet": MatchingNetHead}
    return FewShotClassifier(net, heads[head]() if head == "protonet" else heads[head](net.num_features))
