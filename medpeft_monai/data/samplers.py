"""Batch samplers for episodic training."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from medpeft_monai.distributed import get_rank, get_world_size

__all__ = ["DomainEpisodeSampler"]


class DomainEpisodeSampler(Sampler):
    """Batch sampler of episodes: ``tasks_per_episode`` distinct domains x up to ``shots`` images each.

    Args:
        domain_ids: domain id of every dataset item.
        tasks_per_episode: domains per batch.
        shots: images drawn per domain (without replacement; all of them if the domain has fewer).
        num_episodes: batches per epoch (default: ``ceil(len(domain_ids) / (tasks_per_episode * shots))``).
        class_ids: class label of every item; if given, the domains of an episode are drawn round-robin
            over the classes (by each domain's majority class), so a binary task sees both classes.
        seed: base seed; epoch ``e`` uses ``seed + e``, so runs are reproducible.
        num_replicas, rank: for multi-process training (``torchrun``): every process draws the same
            ``ceil(num_episodes / num_replicas) * num_replicas`` episodes and keeps every
            ``num_replicas``-th one from ``rank`` on, so the processes train on different episodes and
            run the same number of iterations. Default: the ``torch.distributed`` world size and rank
            when a process group is initialised, else 1 and 0.

    Use as ``DataLoader(dataset, batch_sampler=DomainEpisodeSampler(...))``.
    """

    def __init__(self, domain_ids: Sequence[int], tasks_per_episode: int = 2, shots: int = 4,
                 num_episodes: int | None = None, class_ids: Sequence[int] | None = None, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        self.domain_ids = [int(d) for d in domain_ids]
        if not self.domain_ids:
            raise ValueError("DomainEpisodeSampler needs at least one item.")
        if tasks_per_episode < 1 or shots < 1:
            raise ValueError(f"tasks_per_episode and shots must be >= 1, got {tasks_per_episode}, {shots}.")
        self.by_domain: dict[int, list[int]] = defaultdict(list)
        for i, d in enumerate(self.domain_ids):
            self.by_domain[d].append(i)
        self.tasks = min(int(tasks_per_episode), len(self.by_domain))
        self.shots = int(shots)
        self.num_episodes = int(num_episodes or math.ceil(len(self.domain_ids) / (self.tasks * self.shots)))
        self.by_class: dict[int, list[int]] | None = None
        if class_ids is not None:
            if len(class_ids) != len(self.domain_ids):
                raise ValueError("class_ids and domain_ids must have the same length.")
            self.by_class = defaultdict(list)
            for d, items in self.by_domain.items():
                labels = [int(class_ids[i]) for i in items]
                self.by_class[max(set(labels), key=labels.count)].append(d)
        self.seed, self.epoch = int(seed), 0
        self.num_replicas = int(num_replicas if num_replicas is not None else get_world_size())
        self.rank = int(rank if rank is not None else get_rank())
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank={self.rank}, "
                             f"num_replicas={self.num_replicas}.")

    def __len__(self) -> int:
        """Episodes this process runs per epoch."""
        return math.ceil(self.num_episodes / self.num_replicas)

    def _domains(self, rng: np.random.Generator) -> list[int]:
        if self.by_class is None:
            return [int(d) for d in rng.choice(sorted(self.by_domain), size=self.tasks, replace=False)]
        classes = sorted(self.by_class)
        start = int(rng.integers(len(classes)))
        chosen: list[int] = []
        for j in range(self.tasks):
            pool = [d for d in self.by_class[classes[(start + j) % len(classes)]] if d not in chosen]
            pool = pool or [d for d in self.by_domain if d not in chosen]
            chosen.append(int(rng.choice(sorted(pool))))
        return chosen

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        self.epoch += 1
        for episode in range(len(self) * self.num_replicas):
            batch: list[int] = []
            for d in self._domains(rng):
                items = self.by_domain[d]
                batch += [items[i] for i in rng.permutation(len(items))[:self.shots]]
            if episode % self.num_replicas == self.rank:
                yield batch
