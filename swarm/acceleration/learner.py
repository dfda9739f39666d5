"""The meta-learner: from task features to each method's expected outcome, with a calibrated confidence.

- Prediction: k-nearest tasks (the distance-weighted mean outcome of each method on the k most similar recorded
  tasks), or one regressor per quantity over (task features, method one-hot) with scikit-learn's histogram
  gradient-boosted trees. What is predicted is each method's log objective relative to its task's mean over
  methods: how methods rank and by how much transfers between tasks, a task's absolute scale does not.
- Choice: the method with the best predicted objective (latency, throughput or cost) among those whose predicted
  greedy agreement with the exact path keeps the quality floor.
- Knowing when it does not know: a task's novelty is its mean distance to the nearest recorded tasks, in feature
  units scaled by the history's spread. The confidence that the choice is within 5% of the best method is a
  logistic model of (novelty, predicted margin between the two best methods), fitted on out-of-fold choices of
  the history itself, so it is calibrated on tasks the learner did not see. Tasks beyond the novelty the
  history ever showed get the expert rule instead of a guess.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from swarm.acceleration.features import TaskFeatures
from swarm.acceleration.history import Outcome, Record
from swarm.acceleration.methods import METHODS

logger = logging.getLogger(__name__)

GOOD_ENOUGH = 0.05  # a choice within this relative regret of the best method counts as right
NEIGHBOURS = 5


def expert_rule(features: TaskFeatures, available: Iterable[str] = METHODS) -> str:
    """What an expert would pick without history: no compression on a LAN (RTT under 10 ms: codec time is not
    worth it there), otherwise the default 8-bit activations between servers with float16 ends; float weights
    (quantized weights save memory, not time, on most hardware); no local blocks, no chunking, pushes on."""
    available = set(available)
    choice = "exact" if features.rtt_ms < 10.0 else "blockwise8"
    return choice if choice in available else sorted(available)[0]


@dataclass(frozen=True)
class Choice:
    method: str
    reason: str  # "learned", "expert" (novel task or no history), "explore", "explicit"
    confidence: float  # estimated probability that the method is within 5% of the best for this task
    novelty: float  # mean scaled distance to the nearest recorded tasks
    predicted: dict[str, float] | None = None  # method -> predicted objective value


@dataclass
class TaskTable:
    """Records grouped by task: features once, and each method's outcome (the best of repeated runs)."""

    tasks: list[str]
    features: list[TaskFeatures]
    outcomes: list[dict[str, Outcome]]

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> TaskTable:
        grouped: dict[str, tuple[TaskFeatures, dict[str, list[Outcome]]]] = {}
        for record in records:
            if record.method not in METHODS:
                continue
            entry = grouped.setdefault(record.task, (record.features, {}))
            entry[1].setdefault(record.method, []).append(record.outcome)
        tasks, features, outcomes = [], [], []
        for task, (feature, runs) in grouped.items():
            tasks.append(task)
            features.append(feature)
            outcomes.append({method: _best_outcome(values) for method, values in runs.items()})
        return cls(tasks, features, outcomes)

    def subset(self, indices: Iterable[int]) -> TaskTable:
        indices = list(indices)
        return TaskTable([self.tasks[i] for i in indices], [self.features[i] for i in indices],
                         [self.outcomes[i] for i in indices])

    def __len__(self) -> int:
        return len(self.tasks)


def _best_outcome(values: list[Outcome]) -> Outcome:
    """Repeated runs of one method on one task: the best time of each kind (a busy machine only ever slows a run
    down, so the best is the least noisy estimate), mean bytes and quality."""
    qualities = [v.quality for v in values if v.quality is not None]
    return Outcome(ttft_s=min(v.ttft_s for v in values), total_s=min(v.total_s for v in values),
                   tokens_per_s=max(v.tokens_per_s for v in values), bytes=int(np.mean([v.bytes for v in values])),
                   quality=float(np.mean(qualities)) if qualities else None)


def oracle(outcomes: dict[str, Outcome], objective: str, quality_floor: float) -> str | None:
    """The best measured method of a task among those that kept the quality floor (unmeasured quality: kept)."""
    allowed = {m: o for m, o in outcomes.items() if o.quality is None or o.quality >= quality_floor}
    return min(allowed, key=lambda m: allowed[m].objective(objective)) if allowed else None


def regret(outcomes: dict[str, Outcome], method: str, objective: str, quality_floor: float) -> float:
    """How much worse ``method`` measured than the oracle, relative to the oracle (0: it was the best)."""
    best = oracle(outcomes, objective, quality_floor)
    if best is None or method not in outcomes:
        return math.nan
    return outcomes[method].objective(objective) / outcomes[best].objective(objective) - 1.0


class Learner:
    """Predicts every method's outcome for a task; ``choose`` applies an objective and a quality floor."""

    def __init__(self, kind: str = "knn", seed: int = 0, neighbours: int = NEIGHBOURS):
        if kind not in ("knn", "gbt"):
            raise ValueError(f"unknown learner kind {kind!r}: knn or gbt")
        self.kind, self.seed, self.neighbours = kind, seed, neighbours
        self.methods = list(METHODS)
        self.table: TaskTable | None = None
        self.calibration: tuple[float, float, float] | None = None  # logistic (bias, novelty, margin) weights
        self.novelty_limit = self.novelty_seen = math.inf

    # ---- fitting

    def fit(self, records: Iterable[Record], objective: str = "latency", quality_floor: float = 0.9,
            calibrate: bool = True) -> Learner:
        table = records if isinstance(records, TaskTable) else TaskTable.from_records(records)
        if len(table) == 0:
            raise ValueError("no usable records to learn from")
        self.table = table
        self.objective, self.quality_floor = objective, quality_floor
        # Each method's log objective relative to its task's mean over methods: what transfers between tasks is
        # how methods rank and by how much, not the task's absolute scale (a long prompt is slow for every method).
        self.relative = []
        for outcomes in table.outcomes:
            logs = {m: math.log(max(o.objective(objective), 1e-9)) for m, o in outcomes.items()}
            centre = float(np.mean(list(logs.values())))
            self.relative.append({m: value - centre for m, value in logs.items()})
        matrix = np.array([f.vector() for f in table.features])
        self.mean = matrix.mean(0)
        self.scale = np.where(matrix.std(0) > 1e-9, matrix.std(0), 1.0)
        self.points = (matrix - self.mean) / self.scale
        if self.kind == "gbt":
            self._fit_trees(table)
        self.novelty_limit = self.novelty_seen = math.inf
        if calibrate and len(table) >= 6:
            self._calibrate(table)
        return self

    def _fit_trees(self, table: TaskTable) -> None:
        from sklearn.ensemble import HistGradientBoostingRegressor
        from threadpoolctl import threadpool_limits

        rows, targets = [], {"objective": [], "quality": []}
        for feature, outcomes, relative in zip(table.features, table.outcomes, self.relative, strict=True):
            for method, outcome in outcomes.items():
                rows.append(self._row(feature, method))
                targets["objective"].append(relative[method])
                targets["quality"].append(1.0 if outcome.quality is None else outcome.quality)
        # One thread: OpenMP threads fighting servers and clients for the same cores made fitting 20x slower.
        with threadpool_limits(1):
            self.trees = {name: HistGradientBoostingRegressor(max_iter=150, learning_rate=0.1, max_leaf_nodes=15,
                                                              min_samples_leaf=5, random_state=self.seed)
                          .fit(rows, values) for name, values in targets.items()}

    def _row(self, feature: TaskFeatures, method: str) -> list[float]:
        return list(feature.vector()) + [1.0 if m == method else 0.0 for m in self.methods]

    def _calibrate(self, table: TaskTable) -> None:
        """Fit the confidence on out-of-fold choices over the history (by task), and the novelty limit."""
        folds = min(5, len(table))
        order = np.random.default_rng(self.seed).permutation(len(table))
        novelty, margin, right = [], [], []
        for fold in range(folds):
            held = set(order[fold::folds].tolist())
            train = table.subset(i for i in range(len(table)) if i not in held)
            inner = Learner(self.kind, self.seed, self.neighbours).fit(train, self.objective, self.quality_floor,
                                                                       calibrate=False)
            for i in sorted(held):
                choice = inner.choose(table.features[i], fallback=False)
                r = regret(table.outcomes[i], choice.method, self.objective, self.quality_floor)
                if math.isnan(r):
                    continue
                novelty.append(choice.novelty)
                margin.append(_margin(choice.predicted))
                right.append(r <= GOOD_ENOUGH)
        if len(set(right)) < 2:  # always right (or always wrong) out of fold: a constant confidence
            rate = float(np.mean(right)) if right else 0.5
            self.calibration = (math.log(max(rate, 1e-3) / max(1 - rate, 1e-3)), 0.0, 0.0)
        else:
            from sklearn.linear_model import LogisticRegression

            model = LogisticRegression(C=1.0).fit(np.column_stack([novelty, margin]), right)
            self.calibration = (float(model.intercept_[0]), float(model.coef_[0][0]), float(model.coef_[0][1]))
        # Tasks further from the history than any held-out task ever was get the expert rule.
        self.novelty_seen = max(novelty) if novelty else math.inf
        self.novelty_limit = 1.5 * self.novelty_seen

    # ---- prediction

    def novelty(self, features: TaskFeatures) -> float:
        point = (np.array(features.vector()) - self.mean) / self.scale
        distances = np.sort(np.sqrt(((self.points - point) ** 2).sum(1)))
        return float(distances[:NEIGHBOURS].mean())

    def predict(self, features: TaskFeatures) -> dict[str, tuple[float, float]]:
        """Method -> (predicted objective relative to the task's mean method (0.8: 20% better), predicted quality)."""
        if self.table is None:
            raise RuntimeError("the learner has not been fitted")
        if self.kind == "gbt":
            rows = [self._row(features, m) for m in self.methods]
            objective, quality = self.trees["objective"].predict(rows), self.trees["quality"].predict(rows)
            return {m: (math.exp(o), float(q)) for m, o, q in zip(self.methods, objective, quality, strict=True)}
        point = (np.array(features.vector()) - self.mean) / self.scale
        distances = np.sqrt(((self.points - point) ** 2).sum(1))
        result = {}
        for method in self.methods:
            have = [i for i in np.argsort(distances) if method in self.table.outcomes[i]][:self.neighbours]
            if not have:
                continue
            weights = np.array([1.0 / (distances[i] + 1e-3) for i in have])
            logs = np.array([self.relative[i][method] for i in have])
            qualities = np.array([_quality(self.table.outcomes[i][method]) for i in have])
            result[method] = (math.exp(float((weights * logs).sum() / weights.sum())),
                              float((weights * qualities).sum() / weights.sum()))
        return result

    def confidence(self, novelty: float, margin: float) -> float:
        """Estimated probability that the choice is within 5% of the best method. Calibrated on the novelty range
        the history showed; beyond it there is no evidence, so it shrinks in proportion to the distance."""
        if self.calibration is None:
            return 0.5
        bias, a, b = self.calibration
        p = 1.0 / (1.0 + math.exp(-(bias + a * novelty + b * margin)))
        seen = self.novelty_seen
        return p * min(1.0, seen / novelty) if novelty > 0 and math.isfinite(seen) else p

    def choose(self, features: TaskFeatures, available: Iterable[str] | None = None, fallback: bool = True) -> Choice:
        """The method to use for a task (among ``available``), with the confidence in it. With ``fallback``, a
        task more novel than the history supports gets the expert rule."""
        available = [m for m in (available or self.methods) if m in self.methods]
        novelty = self.novelty(features)
        if fallback and novelty > self.novelty_limit:
            return Choice(expert_rule(features, available), "expert", self.confidence(novelty, 0.0), novelty)
        predicted = {m: v for m, v in self.predict(features).items() if m in available}
        keep = {m: o for m, (o, q) in predicted.items() if q >= self.quality_floor} or \
            {m: o for m, (o, q) in predicted.items() if m == "exact"} or {m: o for m, (o, _) in predicted.items()}
        if not keep:
            return Choice(expert_rule(features, available), "expert", 0.0, novelty)
        best = min(keep, key=keep.get)
        return Choice(best, "learned", self.confidence(novelty, _margin(keep)), novelty, keep)


def _quality(outcome: Outcome) -> float:
    return 1.0 if outcome.quality is None else outcome.quality


def _margin(predicted: dict[str, float] | None) -> float:
    """How much better the predicted best method is than the second best (log ratio; large: a clear choice)."""
    if not predicted or len(predicted) < 2:
        return 0.0
    first, second = sorted(predicted.values())[:2]
    return math.log(second / first) if first > 0 else 0.0
