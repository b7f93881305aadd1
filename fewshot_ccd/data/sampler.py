"""Seeded episode sampling for ``torch.utils.data.DataLoader(batch_sampler=...)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .._checks import integer_labels

__all__ = ["EpisodeSampler", "EpisodeCollate", "episode_labels", "split_episode"]

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: episode i gets seed (seed * _MIX + i) mod 2**63


class EpisodeSampler:
    """Yields episodes as lists of dataset indices: ``n_way`` classes, each ``n_shot`` support
    then ``n_query`` query indices, class after class (length ``n_way * (n_shot + n_query)``).

    Episode ``i`` is drawn from its own ``torch.Generator`` seeded from ``(seed, i)``, so episodes
    are reproducible, random-access (:meth:`episode`) and independent of any global RNG; iterating
    twice gives the same list.  ``start`` skips episodes (resume) and ``rank``/``world_size``
    deal episodes round-robin to processes (data-parallel training).

    Args:
        labels: class label of every dataset item, ``(len(dataset),)``.
        n_way, n_shot, n_query: classes per episode, support and query images per class.
        episodes: number of episodes in one pass.
        seed: base seed.
        drop_small_classes: silently ignore classes with fewer than ``n_shot + n_query`` images
            (default False: raise a ValueError naming such a class).
        start, rank, world_size: see above.
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        *,
        n_way: int,
        n_shot: int,
        n_query: int,
        episodes: int,
        seed: int = 0,
        drop_small_classes: bool = False,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        for name, value, low in (("n_way", n_way, 1), ("n_shot", n_shot, 1), ("n_query", n_query, 0),
                                 ("episodes", episodes, 0), ("start", start, 0), ("world_size", world_size, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        labels = integer_labels(labels, "labels")
        classes, counts = torch.unique(labels, return_counts=True)
        need = n_shot + n_query
        small = counts < need
        if small.any() and not drop_small_classes:
            bad = int(classes[small][0])
            raise ValueError(
                f"class {bad} has {int(counts[small][0])} images but an episode needs n_shot + n_query = "
                f"{need} per class ({int(small.sum())} classes too small; pass drop_small_classes=True "
                f"to ignore them)"
            )
        classes = classes[~small]
        if len(classes) < n_way:
            raise ValueError(f"n_way={n_way} but only {len(classes)} classes have >= {need} images")
        order = torch.argsort(labels, stable=True)
        self._per_class = [order[labels[order] == c] for c in classes.tolist()]
        self.classes = classes.tolist()
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.episodes, self.seed, self.start = episodes, seed, start
        self.rank, self.world_size = rank, world_size

    def episode(self, i: int) -> list[int]:
        """Indices of episode ``i`` (support then query for each class in turn)."""
        g = torch.Generator().manual_seed((self.seed * _MIX + i) % (2**63))
        chosen = torch.randperm(len(self._per_class), generator=g)[: self.n_way]
        need = self.n_shot + self.n_query
        out: list[int] = []
        for c in chosen.tolist():
            items = self._per_class[c]
            out += items[torch.randperm(len(items), generator=g)[:need]].tolist()
        return out

    def episode_ids(self) -> range:
        return range(self.start + self.rank, self.episodes, self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for i in self.episode_ids():
            yield self.episode(i)

    def __len__(self) -> int:
        return len(self.episode_ids())


def episode_labels(n_way: int, per_class: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Episode labels of the sampler's class-major layout: ``(n_way * per_class,)``."""
    return torch.arange(n_way, device=device).repeat_interleave(per_class)


def split_episode(
    items: torch.Tensor, n_way: int, n_shot: int, n_query: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one place that knows the episode layout of :meth:`EpisodeSampler.episode` (class after
    class, ``n_shot`` support then ``n_query`` query items each).

    ``items (N * (K + Kq), ...)`` (images or features, in the sampler's order) ->
    ``(support (N*K, ...), support_labels (N*K,), query (N*Kq, ...), query_labels (N*Kq,))``, labels
    ``0..N-1`` in the order the sampler drew the classes.
    """
    per = n_shot + n_query
    if len(items) != n_way * per:
        raise ValueError(f"episode has {len(items)} items, expected n_way * (n_shot + n_query) = {n_way * per}")
    grid = items.view(n_way, per, *items.shape[1:])  # (N, K + Kq, ...)
    support = grid[:, :n_shot].flatten(0, 1)  # (N*K, ...)
    query = grid[:, n_shot:].flatten(0, 1)  # (N*Kq, ...)
    return (support, episode_labels(n_way, n_shot, items.device), query,
            episode_labels(n_way, n_query, items.device))


class EpisodeCollate:
    """``collate_fn`` turning a sampled episode of ``(image, label)`` items into
    ``(support (N*K, C, H, W), support_labels (N*K,), query (N*Kq, C, H, W), query_labels (N*Kq,))``
    (see :func:`split_episode`)."""

    def __init__(self, n_way: int, n_shot: int, n_query: int) -> None:
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        per = self.n_shot + self.n_query
        if len(items) != self.n_way * per:
            raise ValueError(f"episode has {len(items)} items, expected n_way * (n_shot + n_query) = "
                             f"{self.n_way * per}")
        return split_episode(torch.stack([item[0] for item in items]), self.n_way, self.n_shot, self.n_query)


