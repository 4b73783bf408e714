"""What a sweep leaves in MLflow and Optuna for a reader: one parent run per study, continued on resume, whose
description tells what happened; child runs named by what they are, spanning their evaluation, pruned ones not
shown as failures; objectives named for optuna-dashboard. Real sqlite MLflow, real journal, real in-process
evaluators on gmm:ring8."""

from __future__ import annotations

import optuna
import pytest
from mlflow import MlflowClient

from pipeline.evaluation.inprocess import InProcessEvaluator
from pipeline.models.load import load_model
from search.study import make_storage
from search.sweep import SweepConfig, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(model="gmm:ring8", nfe=5, num_seeds=16, holdout_seeds=16, teacher_nfe=50, polish=2, holdout_fid=False,
            baselines=("uniform", "quadratic", "karras", "dp"), dp_seeds=8, dp_grid=30)


@pytest.fixture(scope="module")
def ring8():
    return load_model("gmm:ring8")


@pytest.fixture(scope="module")
def evaluators(ring8):
    cache: dict[tuple[int, ...], InProcessEvaluator] = {}

    def make(seeds):
        return cache.setdefault(tuple(seeds), InProcessEvaluator(ring8, tuple(seeds), teacher_nfe=50))

    return make


def sweep(tmp, ring8, evaluators, trials, resume=False, uri=None, name="s"):
    return run_sweep(SweepConfig(trials=trials, **BASE), study_name=name, out_dir=tmp / "out", model=ring8,
                     evaluators=evaluators, tracking_uri=uri or f"sqlite:///{tmp / 'mlflow.db'}", resume=resume,
                     figures=False, log=lambda *_: None)


def runs_of(uri: str):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("stridelab-sweep")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return c, exp, parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, ring8, evaluators):
    tmp = tmp_path_factory.mktemp("story")
    first = sweep(tmp, ring8, evaluators, trials=10)
    second = sweep(tmp, ring8, evaluators, trials=16, resume=True)
    return tmp, first, second


def test_resume_continues_the_one_parent_run(resumed):
    tmp, first, second = resumed
    c, exp, parents, kids = runs_of(f"sqlite:///{tmp / 'mlflow.db'}")
    assert [p.info.run_id for p in parents] == [first.parent_run_id] == [second.parent_run_id]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["segments"] == "2" and tags["resumed_at"] and tags["segment.2.trials"] == "16"
    assert parent.data.params["trials"] == "10"  # params are immutable: the first segment's value stays
    note = tags["mlflow.note.content"].splitlines()
    assert [ln.split(" ", 3)[3] for ln in note] == [
        "started: 10 trials", "finished: 10 of 10 trials", "resumed at 10 of 16 trials", "finished: 16 of 16 trials"]
    assert len(kids) == 16 and sorted(int(k.data.tags["trial"]) for k in kids) == list(range(16))
    assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parent.info.run_id}
    # key numbers on the parent: the best tuning value as the trials went, and the held-out ratio
    assert "best_recon" in parent.data.metrics and "x_best_baseline" in parent.data.metrics
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_child_runs_are_named_timed_and_pruned_is_not_a_failure(resumed):
    tmp, *_ = resumed
    _, _, _, kids = runs_of(f"sqlite:///{tmp / 'mlflow.db'}")
    study = optuna.load_study(study_name="s", storage=make_storage(tmp / "out" / "optuna.journal"))
    by_number = {int(k.data.tags["trial"]): k for k in kids}
    for t in study.trials:
        run = by_number[t.number]
        kind = t.user_attrs["kind"]
        what = {"baseline": f"baseline {t.user_attrs['schedule']}", "polish": "polish"}.get(kind, "tpe")
        suffix = {"PRUNED": " (pruned)", "FAIL": " (failed)"}.get(t.state.name, "")
        assert run.info.run_name == f"trial {t.number} · {what}{suffix}"
        assert run.data.tags["state"] == t.state.name
        assert run.info.status == ("FAILED" if t.state.name == "FAIL" else "FINISHED")
        # the run spans the evaluation that carried the trial, not the few ms it takes to log it
        assert run.info.end_time - run.info.start_time >= 0.5 * 1000 * t.user_attrs.get("seconds", 0.0) > 0
    assert {"PRUNED", "COMPLETE"} <= {t.state.name for t in study.trials}
    assert by_number[0].info.run_name == "trial 0 · baseline uniform"


def test_objectives_are_named_for_optuna_dashboard(resumed):
    tmp, *_ = resumed
    study = optuna.load_study(study_name="s", storage=make_storage(tmp / "out" / "optuna.journal"))
    assert study.metric_names == ["recon"]


class Interrupting:
    """A real evaluator that raises KeyboardInterrupt (Ctrl-C) on its `at`-th evaluate call."""

    def __init__(self, ev, at: int, calls: list[int]):
        self.ev, self.at, self.calls = ev, at, calls

    def evaluate(self, schedules, solver=None):
        self.calls.append(1)
        if len(self.calls) == self.at:
            raise KeyboardInterrupt
        return self.ev.evaluate(schedules, solver)


def test_interrupted_then_resumed_story_and_other_store_link(tmp_path, ring8, evaluators):
    calls: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(SweepConfig(trials=14, **BASE), study_name="k", out_dir=tmp_path / "out", model=ring8,
                  evaluators=lambda seeds: Interrupting(evaluators(seeds), 5, calls),
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", figures=False, log=lambda *_: None)
    _, _, (parent,), _ = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert parent.info.status == "KILLED"
    assert "interrupted at" in parent.data.tags["mlflow.note.content"].splitlines()[-1]
    sweep(tmp_path, ring8, evaluators, trials=14, resume=True, name="k")
    _, _, (parent2,), kids = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert parent2.info.run_id == parent.info.run_id and parent2.info.status == "FINISHED"
    assert parent2.data.tags["segments"] == "2" and len(kids) == 14
    # the same study resumed against another tracking store: a new parent, linked to the first by tag
    other = f"sqlite:///{tmp_path / 'other.db'}"
    sweep(tmp_path, ring8, evaluators, trials=16, resume=True, name="k", uri=other)
    _, _, (linked,), kids = runs_of(other)
    assert linked.data.tags["stridelab.resumed_from"] == parent.info.run_id
    assert "not in this tracking store" in linked.data.tags["mlflow.note.content"] and len(kids) == 2
