"""Held-out evaluation of method selection: regret against the oracle, accuracy, calibration, novelty detection.

Splits are by task (all runs of a task are on one side), so a learner is always judged on tasks it never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from swarm.acceleration.learner import GOOD_ENOUGH, Learner, TaskTable, expert_rule, oracle, regret


@dataclass
class Evaluation:
    learner_regret: float  # mean relative regret of the learner's picks on held-out tasks
    random_regret: float  # expected regret of a uniformly random method
    expert_regret: float  # regret of the expert rule
    accuracy: float  # picks that were the oracle's method
    expert_accuracy: float
    floor_violations: float  # picks whose measured quality was below the floor
    ece: float  # expected calibration error of the confidence (is the pick within 5% of the best?)
    tasks: int
    confidences: list[float]
    corrects: list[bool]

    def summary(self) -> str:
        return (f"regret: learner {self.learner_regret:.3f}, random {self.random_regret:.3f}, expert "
                f"{self.expert_regret:.3f}; accuracy: learner {self.accuracy:.3f}, expert {self.expert_accuracy:.3f}"
                f"; floor violations {self.floor_violations:.3f}; confidence ECE {self.ece:.3f} "
                f"({self.tasks} held-out tasks)")


def cross_validate(table: TaskTable, kind: str = "knn", objective: str = "latency", quality_floor: float = 0.9,
                   folds: int = 5, seed: int = 0, fallback: bool = True) -> Evaluation:
    order = np.random.default_rng(seed).permutation(len(table))
    learner_r, random_r, expert_r, right, expert_right, violations, confidences, corrects = ([] for _ in range(8))
    for fold in range(folds):
        held = set(order[fold::folds].tolist())
        learner = Learner(kind, seed).fit(table.subset(i for i in range(len(table)) if i not in held), objective,
                                          quality_floor)
        for i in sorted(held):
            outcomes, features = table.outcomes[i], table.features[i]
            best = oracle(outcomes, objective, quality_floor)
            if best is None:
                continue
            choice = learner.choose(features, available=list(outcomes), fallback=fallback)
            r = regret(outcomes, choice.method, objective, quality_floor)
            learner_r.append(r)
            random_r.append(float(np.mean([regret(outcomes, m, objective, quality_floor) for m in outcomes])))
            expert = expert_rule(features, outcomes)
            expert_r.append(regret(outcomes, expert, objective, quality_floor))
            right.append(choice.method == best)
            expert_right.append(expert == best)
            quality = outcomes[choice.method].quality
            violations.append(quality is not None and quality < quality_floor)
            confidences.append(choice.confidence)
            corrects.append(r <= GOOD_ENOUGH)
    return Evaluation(learner_regret=float(np.mean(learner_r)), random_regret=float(np.mean(random_r)),
                      expert_regret=float(np.mean(expert_r)), accuracy=float(np.mean(right)),
                      expert_accuracy=float(np.mean(expert_right)), floor_violations=float(np.mean(violations)),
                      ece=expected_calibration_error(confidences, corrects), tasks=len(learner_r),
                      confidences=confidences, corrects=corrects)


def expected_calibration_error(confidences: list[float], corrects: list[bool], bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their sizes."""
    if not confidences:
        return math.nan
    conf, ok = np.array(confidences), np.array(corrects, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf >= lo) & ((conf < hi) if hi < 1 else (conf <= hi))
        if inside.any():
            total += inside.sum() / len(conf) * abs(ok[inside].mean() - conf[inside].mean())
    return float(total)


def auroc(positives: list[float], negatives: list[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not positives or not negatives:
        return math.nan
    pos, neg = np.array(positives)[:, None], np.array(negatives)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def novelty_detection(table: TaskTable, is_unusual: list[bool], kind: str = "knn", objective: str = "latency",
                      quality_floor: float = 0.9, seed: int = 0) -> dict:
    """Train on the usual tasks (minus a held-out fifth), then score the held-out usual tasks and all unusual ones:
    how well low confidence (and high novelty) separates unusual from usual (AUROC), and what the fallback does."""
    usual = [i for i, u in enumerate(is_unusual) if not u]
    unusual = [i for i, u in enumerate(is_unusual) if u]
    rng = np.random.default_rng(seed)
    held = set(rng.choice(usual, size=max(1, len(usual) // 5), replace=False).tolist())
    learner = Learner(kind, seed).fit(table.subset(i for i in usual if i not in held), objective, quality_floor)

    def scored(indices: list[int]) -> tuple[list[float], list[float], list[float], list[float]]:
        novelty, confidence, fallback_regret, forced_regret = [], [], [], []
        for i in indices:
            outcomes, features = table.outcomes[i], table.features[i]
            choice = learner.choose(features, available=list(outcomes))
            forced = learner.choose(features, available=list(outcomes), fallback=False)
            novelty.append(choice.novelty)
            confidence.append(learner.confidence(forced.novelty, _margin_of(forced)))
            fallback_regret.append(regret(outcomes, choice.method, objective, quality_floor))
            forced_regret.append(regret(outcomes, forced.method, objective, quality_floor))
        return novelty, confidence, fallback_regret, forced_regret

    n_in, c_in, f_in, _ = scored(sorted(held))
    n_out, c_out, f_out, forced_out = scored(unusual)
    return {"auroc_novelty": auroc(n_out, n_in), "auroc_confidence": auroc([-c for c in c_out], [-c for c in c_in]),
            "flagged_unusual": float(np.mean([n > learner.novelty_limit for n in n_out])),
            "flagged_usual": float(np.mean([n > learner.novelty_limit for n in n_in])),
            "regret_unusual_with_fallback": float(np.nanmean(f_out)),
            "regret_unusual_forced_learner": float(np.nanmean(forced_out)),
            "regret_usual": float(np.nanmean(f_in)),
            "mean_confidence_usual": float(np.mean(c_in)), "mean_confidence_unusual": float(np.mean(c_out))}


def _margin_of(choice) -> float:
    from swarm.acceleration.learner import _margin

    return _margin(choice.predicted)
