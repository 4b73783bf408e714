"""MLflow tracking of a sweep: one parent run, one nested child run per trial.

Everything goes through `mlflow.MlflowClient` with explicit run ids (the fluent API keeps a global
active-run stack and is not thread-safe). Default tracking URI: ``sqlite:///<cwd>/mlflow.db`` (MLflow's
own default since the file store was dropped), with artifacts in ``<db dir>/mlartifacts``; a server
(``http://host:5000``) via ``--tracking-uri``.

Parent run: config params, best schedule JSON, plots, sample grids, comparison table (CSV artifact and
``holdout_recon/<schedule>`` metrics). Child run ``trial-<n>`` (tag ``mlflow.parentRunId``): params
``timesteps``, ``space``, ``sampler``, ``kind``, ``schedule`` and the space's parameters as ``p.<name>``;
metrics ``recon``, ``fid``, ``seconds``, ``screen_recon``; tag ``state`` (COMPLETE / PRUNED / FAIL).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import StridelabError

DEFAULT_EXPERIMENT = "stridelab-sweep"


def default_tracking_uri(cwd: str | os.PathLike | None = None) -> str:
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def ui_command(tracking_uri: str) -> str:
    """What to run to look at the runs."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"stridelab ui --tracking-uri {tracking_uri}"


def _status(state: str) -> str:
    return {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}.get(state, "FINISHED")


def _param(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s[:6000]


class Tracker:
    """A sweep's MLflow runs.

    Args:
        tracking_uri: MLflow tracking URI (default: sqlite in the working directory).
        experiment: experiment name, created when missing.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if self.tracking_uri.startswith("sqlite:///"):
                db = Path(self.tracking_uri[len("sqlite:///"):])
                artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
        else:
            self.experiment_id = exp.experiment_id
        self.run_id: str | None = None

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, _param(v)) for k, v in params.items()])
        return self.run_id

    def log_trial(self, number: int, state: str, params: Mapping[str, Any], metrics: Mapping[str, float],
                  tags: Mapping[str, str] | None = None) -> str:
        """A finished child run for trial `number`."""
        from mlflow.entities import Metric, Param

        if self.run_id is None:
            raise StridelabError("Tracker.start must come before log_trial")
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{number}",
            tags={"mlflow.parentRunId": self.run_id, "trial": str(number), "state": state, **dict(tags or {})},
        )
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
        self.client.log_batch(run.info.run_id, metrics=ms, params=[Param(k, _param(v)) for k, v in params.items()])
        self.client.set_terminated(run.info.run_id, _status(state))
        return run.info.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i : i + 500])

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def close_stale(self, parent_run_ids: list[str], status: str = "KILLED") -> list[str]:
        """Mark runs left RUNNING by a driver that died (the parents in `parent_run_ids` and their child
        runs) as `status`; returns their ids. Only for resume: it assumes no other driver is live."""
        from mlflow.exceptions import MlflowException

        closed = []
        for pid in parent_run_ids:
            try:
                parent = self.client.get_run(pid)
            except MlflowException:
                continue  # another tracking store, or deleted
            kids = self.client.search_runs([parent.info.experiment_id],
                                           f"tags.mlflow.parentRunId = '{pid}' and attributes.status = 'RUNNING'")
            for run in [*kids, parent]:
                if run.info.status == "RUNNING":
                    self.client.set_terminated(run.info.run_id, status)
                    closed.append(run.info.run_id)
        return closed

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
