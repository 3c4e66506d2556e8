"""scripts/fair_compare.py's arithmetic: the cost measurement times each config in turn, the @time arms'
steps scale by MAML's seconds and split the two-stage recipe; a typo in an override stops it before
anything runs. The script run on tiny arms: tests/integration/test_fair_compare_script.py (slow)."""

from tests.helpers import FAIR_COMPARE_TINY as TINY
from tests.helpers import load_script

fc = load_script("fair_compare")


def test_cost_measurement_times_each_config_in_turn(monkeypatch):
    step_cost = load_script("step_cost")

    order = []

    class Fake:
        def __init__(self, name, seconds):
            self.name, self.seconds = name, seconds

        def step(self):
            order.append(self.name)
            return self.seconds

    runners = {"a": Fake("a", 2.0), "b": Fake("b", 0.5)}
    times = step_cost.interleaved_seconds(runners, rounds=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-up, then one step each per round
    assert times == {"a": [2.0] * 3, "b": [0.5] * 3}
    assert step_cost.median_seconds(runners, rounds=1, warmup=0) == {"a": 2.0, "b": 0.5}


def test_time_steps_scale_by_maml_seconds_and_split_two_stage():
    assert fc.arm_steps("maml", 7) == (7, None)
    assert fc.arm_steps("two_stage", 7) == (4, 3)  # erm steps + maml steps = the single-stage budget
    assert fc.time_steps("erm", 10, maml_train_s=30.0, arm_train_s=12.0) == (25, None)
    assert fc.time_steps("two_stage", 10, maml_train_s=30.0, arm_train_s=15.0) == (10, 10)
    assert fc.time_steps("metasgd", 10, maml_train_s=30.0, arm_train_s=33.0) is None  # not cheaper: no run
    assert fc.time_steps("erm", 10, maml_train_s=30.0, arm_train_s=29.0) is None  # no extra step fits


def test_a_typo_in_an_override_stops_with_the_key(tmp_path, capsys):
    assert fc.main([*TINY, "--out", str(tmp_path), "--arms", "erm", "--override", "meta.inner_lrr=0.1"]) == 2
    assert "inner_lrr" in capsys.readouterr().err
    assert not (tmp_path / "erm").exists()
