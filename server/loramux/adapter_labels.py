"""A bounded set of adapter ids that get their own metric label; the rest share "other"."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

BASE_LABEL = "base"
OTHER_LABEL = "other"


class AdapterLabels:
    """Maps adapter ids onto a bounded label set: the `max_labels` most active ids
    keep their own label, the base model is `base`, everything else is `other`.

    Activity is an exponentially decayed request count (half-life `half_life_s`),
    so "most active" means recently active. A newcomer takes the label of the
    weakest labelled id only when its score beats that one's by `HYSTERESIS`, so
    two adapters of similar traffic do not flap. A demoted id's series are
    removed by the caller rather than folded into `other`: every exposed series
    stays monotonic, and nothing is counted twice.
    Ids `base` and `other` are valid adapter ids; they are always reported as
    `other` so they can never be confused with the reserved values.
    Not thread-safe: `Metrics` holds one lock across the lookup and the counter
    updates, so a demoted id's series cannot be re-created by a racing request.
    """

    HYSTERESIS = 1.5

    def __init__(self, max_labels: int, half_life_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_labels < 0:
            raise ValueError(f"max_labels must be >= 0, got {max_labels}")
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self._max = max_labels
        self._tau = half_life_s / math.log(2)
        self._clock = clock
        # Scores of recently seen ids, bounded so a flood of distinct ids cannot
        # grow memory: id -> (score, time of score).
        self._scores: dict[str, tuple[float, float]] = {}
        self._capacity = max(64, 4 * max_labels)
        self._labelled: set[str] = set()

    def _score(self, adapter_id: str, now: float) -> float:
        score, at = self._scores.get(adapter_id, (0.0, now))
        return score * math.exp(-(now - at) / self._tau)

    def _prune(self, now: float) -> None:
        # Drop the weaker half of the unlabelled ids; amortised O(1) per new id.
        unlabelled = [k for k in self._scores if k not in self._labelled]
        unlabelled.sort(key=lambda k: self._score(k, now))
        for k in unlabelled[: max(1, len(unlabelled) // 2)]:
            del self._scores[k]

    def label(self, adapter_id: str | None) -> tuple[str, str | None]:
        """Records one request for `adapter_id`; returns its label value and the
        id that lost its label to it (whose series the caller removes), if any."""
        if not adapter_id:
            return BASE_LABEL, None
        if adapter_id in (BASE_LABEL, OTHER_LABEL):
            return OTHER_LABEL, None
        now = self._clock()
        if adapter_id not in self._scores and len(self._scores) >= self._capacity:
            self._prune(now)
        score = self._score(adapter_id, now) + 1.0
        self._scores[adapter_id] = (score, now)
        if adapter_id in self._labelled:
            return adapter_id, None
        if len(self._labelled) < self._max:
            self._labelled.add(adapter_id)
            return adapter_id, None
        if not self._labelled:  # max_labels == 0
            return OTHER_LABEL, None
        weakest = min(self._labelled, key=lambda k: self._score(k, now))
        if score <= self.HYSTERESIS * self._score(weakest, now):
            return OTHER_LABEL, None
        self._labelled.discard(weakest)
        self._labelled.add(adapter_id)
        return adapter_id, weakest

    def labelled(self) -> frozenset[str]:
        return frozenset(self._labelled)
