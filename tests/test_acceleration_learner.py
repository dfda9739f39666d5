"""The acceleration learner on fixed data: deterministic, right where the answer is known, careful where it is not."""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path

import pytest

from swarm.acceleration import METHODS, History, Outcome, Record, TaskFeatures, load_dataset
from swarm.acceleration.evaluation import cross_validate, expected_calibration_error, novelty_detection
from swarm.acceleration.learner import Learner, TaskTable, expert_rule

DATASET = Path(__file__).parent.parent / "benchmarks" / "data" / "acceleration_history.jsonl"


def features(rtt_ms: float = 1.0, mbit: float = 1000.0, prompt: int = 16, new_tokens: int = 16, batch: int = 1,
             params: float = 1e8, cores: int = 2, gpu: int = 0) -> TaskFeatures:
    return TaskFeatures(model_params=params, num_blocks=30, hidden_size=576, dtype_bytes=4, cpu_cores=cores, gpu=gpu,
                        batch_size=batch, prompt_length=prompt, new_tokens=new_tokens, chain_length=2,
                        rtt_ms=rtt_ms, bandwidth_mbit=mbit)


def synthetic(best: str, seed: int = 0, quality_of: dict[str, float] | None = None) -> list[Record]:
    """A history over a grid of tasks where ``best`` is 30% faster than every other method, by construction;
    times otherwise grow with RTT, prompt and generated length, with 3% noise."""
    rng = random.Random(seed)
    records = []
    grid = itertools.product([1, 20, 80], [10, 100, 1000], [16, 128], [4, 24], [1, 3])
    for n, (rtt, mbit, prompt, new, batch) in enumerate(grid):
        feature = features(rtt, mbit, prompt, new, batch)
        base = new * (0.05 + rtt / 1000) + prompt * batch * 4e-4 * (1000 / mbit) ** 0.5
        for method in METHODS:
            total = base * (0.7 if method == best else 1.0 + 0.1 * (hash(method) % 5)) * rng.uniform(0.97, 1.03)
            quality = (quality_of or {}).get(method, 1.0)
            records.append(Record(f"task-{n}", feature, method, Outcome(total * 0.2, total, new * batch / total,
                                                                       int(1e5 * prompt), quality)))
    return records


def test_picks_the_method_that_is_best_by_construction():
    evaluation = cross_validate(TaskTable.from_records(synthetic("relay")), "knn")
    assert evaluation.accuracy == 1.0, evaluation.summary()
    assert evaluation.learner_regret == 0.0
    assert evaluation.random_regret > 0.2 and evaluation.expert_regret > 0.2
    for kind in ("knn", "gbt"):
        learner = Learner(kind).fit(synthetic("relay"), calibrate=kind == "knn")  # trees: slow to cross-validate
        assert learner.choose(features(rtt_ms=40, mbit=50, prompt=64)).method == "relay"


def test_training_and_prediction_are_deterministic():
    records = synthetic("float16", seed=3)
    for kind in ("knn", "gbt"):
        first, second = Learner(kind, seed=1).fit(records), Learner(kind, seed=1).fit(list(records))
        query = features(rtt_ms=33, mbit=70, prompt=50, new_tokens=10)
        assert first.predict(query) == second.predict(query)
        assert first.choose(query) == second.choose(query)
        assert first.calibration == second.calibration


def test_quality_floor_is_respected():
    # blockwise8-ends is fastest by construction, but it flips greedy tokens
    records = synthetic("blockwise8-ends", quality_of={"blockwise8-ends": 0.4, "nf4-weights": 0.5})
    for kind in ("knn", "gbt"):
        strict = Learner(kind).fit(records, quality_floor=0.9, calibrate=False)
        assert strict.choose(features(rtt_ms=50, mbit=20)).method not in ("blockwise8-ends", "nf4-weights")
        lax = Learner(kind).fit(records, quality_floor=0.3, calibrate=False)
        assert lax.choose(features(rtt_ms=50, mbit=20)).method == "blockwise8-ends"


def test_a_task_unlike_the_history_gets_the_expert_rule():
    learner = Learner().fit(synthetic("relay"))
    usual = learner.choose(features(rtt_ms=20, mbit=100))
    assert usual.reason == "learned" and usual.method == "relay"
    for unusual in (features(params=1e11), features(cores=256, gpu=1)):  # a 1000x larger model; new hardware
        choice = learner.choose(unusual)
        assert choice.reason == "expert" and choice.method == expert_rule(unusual)
        assert choice.novelty > learner.novelty_limit
        assert learner.confidence(choice.novelty, 0.0) < usual.confidence


def test_calibration_error_is_computed_against_outcomes():
    assert expected_calibration_error([0.9] * 10, [True] * 9 + [False]) == pytest.approx(0.0)
    assert expected_calibration_error([1.0] * 4, [False] * 4) == pytest.approx(1.0)


def test_corrupt_or_empty_history_falls_back_to_the_rule(tmp_path, caplog):
    bad = tmp_path / "history.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING):
        assert History(bad).records() == []
    assert "unreadable" in caplog.text
    lines = tmp_path / "history.jsonl"
    lines.write_text('{"task": 1}\nnot json\n' + synthetic("relay")[0].to_json() + "\n")
    with caplog.at_level(logging.WARNING):
        assert len(load_dataset(lines)) == 1
    assert "Skipped 2 unreadable" in caplog.text
    with pytest.raises(ValueError, match="no usable records"):
        Learner().fit([])


@pytest.mark.skipif(not DATASET.exists(), reason="the collected history is not in this checkout")
def test_collected_history_beats_random_and_expert():
    """On the real history collected on this machine: held-out regret, split by task."""
    table = TaskTable.from_records(load_dataset(DATASET))
    assert len(table) >= 40 and sum(len(o) for o in table.outcomes) >= 300
    evaluation = cross_validate(table, "knn")
    assert evaluation.learner_regret <= 0.05, evaluation.summary()
    assert evaluation.learner_regret < evaluation.random_regret and evaluation.learner_regret < \
        evaluation.expert_regret, evaluation.summary()
    detection = novelty_detection(table, [f.model_params > 1e8 for f in table.features])
    assert detection["auroc_novelty"] > 0.9, detection
