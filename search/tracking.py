"""MLflow tracking of a sweep: one parent run, one nested child run per trial.

Everything goes through `mlflow.MlflowClient` with explicit run ids (the fluent API keeps a global
active-run stack and is not thread-safe). Default tracking URI: ``sqlite:///<cwd>/mlflow.db`` (MLflow's
own default since the file store was dropped), with artifacts in ``<db dir>/mlartifacts``; a server
(``http://host:5000``) via ``--tracking-uri``.

Parent run, one per study (tags ``study`` and ``stridelab.storage`` find it again; ``--resume`` continues it):
config params, best schedule JSON, plots, sample grids, comparison table (CSV artifact and
``holdout_recon/<schedule>`` metrics), ``best_<objective>`` stepped by finished trials; tag ``segments`` (driver
runs that wrote to it, ``segment.<n>.<param>`` for a param that changed, ``resumed_at``) and a description
(``mlflow.note.content``) with one timestamped line per event: started, interrupted, resumed, finished.
Child run ``trial <n> · <what>`` (``tpe``, ``baseline uniform``, ``polish``; `` (pruned)`` / `` (failed)``; tag
``mlflow.parentRunId``), spanning the evaluation that carried the trial: params ``timesteps``, ``space``,
``sampler``, ``kind``, ``schedule`` and the space's parameters as ``p.<name>``; metrics ``recon``, ``fid``,
``seconds``, ``screen_recon``; tag ``state`` (COMPLETE / PRUNED / FAIL); status FINISHED, FAILED for FAIL.

Tracking server outage (buffer and replay): once the parent run exists, every write that fails because the server
is unreachable (or answers 5xx) is queued in order and replayed before the next write (at most every
`RETRY_EVERY_S`), and at `Tracker.end`, which waits up to `FINAL_FLUSH_S` for the server and otherwise says how
many records were not written. Replayed child runs are not duplicated (a replay first looks for the run a lost
response may have created). MLflow's own HTTP retries (7 retries, backoff factor 2, timeout 120 s by default:
minutes of stall per call) are bounded by `bound_http_retries` unless the user set them.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping
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
    """MLflow status of a trial's child run. A pruned trial is FINISHED (its ``state`` tag says PRUNED): it was
    stopped on purpose, and MLflow's UI draws both FAILED and KILLED as a red failure."""
    return "FAILED" if state == "FAIL" else "FINISHED"


def _param(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s[:6000]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _clock(ms: int | None = None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((ms if ms is not None else _now_ms()) / 1000))


def storage_key(storage: str | os.PathLike) -> str:
    """How a parent run names the Optuna storage of its study: an absolute path for a journal file, the URL
    without its password for a database."""
    spec = str(storage)
    if "://" in spec:
        return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1@", spec)
    return str(Path(spec).resolve())


RETRY_EVERY_S = 5.0
"""While writes are queued, how often a new write first tries to replay them."""
FINAL_FLUSH_S = 60.0
"""How long `Tracker.end` waits for an unreachable tracking server before giving up on the queued writes."""
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
"""MLflow's HTTP retry settings for a sweep (~3 s of retries per call against a stopped server instead of minutes)."""


def bound_http_retries(environ: dict | None = None) -> None:
    """Set `HTTP_RETRY_DEFAULTS` in the environment where the user has not set them (the buffer replaces long retries)."""
    env = os.environ if environ is None else environ
    for k, v in HTTP_RETRY_DEFAULTS.items():
        env.setdefault(k, v)


def unreachable(e: Exception) -> bool:
    """A tracking write failed because the server is down or failing (connection error, timeout, 5xx), not
    because the request was wrong."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.get_http_status_code() >= 500
    return isinstance(e, OSError)


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""MLflow 3 opens an experiment without this tag in its GenAI view; a sweep is model development."""


class Tracker:
    """A sweep's MLflow runs: one parent run per study (continued on resume), one child run per trial.

    The parent's description (``mlflow.note.content``) tells its story, one timestamped line per event
    (started, interrupted, resumed, finished); tag ``segments`` counts the driver runs that wrote to it.

    Args:
        tracking_uri: MLflow tracking URI (default: sqlite in the working directory).
        experiment: experiment name, created when missing (as a model-development experiment, `EXPERIMENT_KIND`).
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 log: Callable[[str], None] = print):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri()
        if self.tracking_uri.startswith(("http://", "https://")):
            bound_http_retries()
        self.log = log
        self.pending: list[Callable[[], None]] = []
        self._last_try = 0.0
        self.client = MlflowClient(self.tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if self.tracking_uri.startswith("sqlite:///"):
                db = Path(self.tracking_uri[len("sqlite:///"):])
                artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location,
                                                               tags=dict([EXPERIMENT_KIND]))
        else:
            self.experiment_id = exp.experiment_id
            if EXPERIMENT_KIND[0] not in exp.tags:  # made before the tag was set; a kind a user chose stays
                self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
        self.run_id: str | None = None

    # -- the parent run -----------------------------------------------------------------------------
    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
              story: str = "started") -> str:
        """A new parent run (segment 1); `story`: the first line of its description."""
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={**dict(tags or {}), "segments": "1"})
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, _param(v)) for k, v in params.items()])
        self.story(story)
        return self.run_id

    def find_parent(self, tags: Mapping[str, str]) -> str | None:
        """The newest parent run of this experiment carrying every tag in `tags`, or None."""
        where = " and ".join(f"tags.`{k}` = '{v.replace(chr(39), chr(39) * 2)}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], where, max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def reopen(self, run_id: str, params: Mapping[str, Any], story: str) -> str:
        """Continue parent run `run_id` as its next segment: status RUNNING again, params it lacks logged (MLflow
        params are immutable: a value that changed, e.g. ``trials``, is kept as tag ``segment.<n>.<key>``)."""
        from mlflow.entities import Param

        run = self.client.get_run(run_id)
        self.run_id = run_id
        segment = int(run.data.tags.get("segments", "1")) + 1
        self.client.update_run(run_id, status="RUNNING")
        old = run.data.params
        new = [Param(k, _param(v)) for k, v in params.items() if k not in old]
        if new:
            self.client.log_batch(run_id, params=new)
        for k, v in params.items():
            if k in old and old[k] != _param(v):
                self.client.set_tag(run_id, f"segment.{segment}.{k}", _param(v)[:5000])
        self.client.set_tag(run_id, "segments", str(segment))
        self.client.set_tag(run_id, "resumed_at", _clock())
        self.story(story)
        return run_id

    def story(self, line: str) -> None:
        """Append one timestamped line to the parent's description."""
        text, run_id = f"- {_clock()} {line}\n", self.run_id

        def write() -> None:
            note = self.client.get_run(run_id).data.tags.get("mlflow.note.content", "")
            self.client.set_tag(run_id, "mlflow.note.content", note + text)
        self._write(write)

    def end(self, status: str = "FINISHED", story: str | None = None, flush_s: float = FINAL_FLUSH_S) -> None:
        """End the parent run, after replaying the writes an outage queued (waiting up to `flush_s` for the server)."""
        if self.run_id is not None:
            if story:
                self.story(story)
            run_id = self.run_id
            self._write(lambda: self.client.set_terminated(run_id, status))
            self.flush(flush_s)

    # -- outages: buffer and replay -----------------------------------------------------------------
    def _write(self, op: Callable[[], None]) -> None:
        """Run `op` (one idempotent-on-replay write) now, or queue it behind earlier writes an outage left."""
        if self.pending and time.monotonic() - self._last_try >= RETRY_EVERY_S:
            self._replay()
        if self.pending:
            self.pending.append(op)
            return
        try:
            op()
        except Exception as e:  # noqa: BLE001 -- `unreachable` decides; anything else is re-raised
            if not unreachable(e):
                raise
            self.pending.append(op)
            self._last_try = time.monotonic()
            self.log(f"MLflow at {self.tracking_uri} unreachable ({str(e).splitlines()[0][:160]}): "
                     "queueing its records, replaying them when it answers")

    def _replay(self) -> bool:
        """Replay the queued writes in order, stopping at the first that still fails; True when none is left."""
        self._last_try = time.monotonic()
        n = len(self.pending)
        while self.pending:
            try:
                self.pending[0]()
            except Exception as e:  # noqa: BLE001
                if not unreachable(e):
                    raise
                return False
            self.pending.pop(0)
        self.log(f"MLflow at {self.tracking_uri} answers again: replayed {n} queued records")
        return True

    def flush(self, wait_s: float = FINAL_FLUSH_S) -> bool:
        """Replay the queued writes, retrying for up to `wait_s`; True when all were written. Says so when not."""
        deadline = time.monotonic() + wait_s
        while self.pending:
            if self._replay():
                return True
            if time.monotonic() >= deadline:
                self.log(f"MLflow at {self.tracking_uri} still unreachable after {wait_s:.0f} s: {len(self.pending)} "
                         "records not written (every trial is still in the Optuna study)")
                return False
            time.sleep(min(RETRY_EVERY_S, max(0.0, deadline - time.monotonic())))
        return True

    # -- child runs ---------------------------------------------------------------------------------
    def log_trial(self, number: int, state: str, params: Mapping[str, Any], metrics: Mapping[str, float],
                  tags: Mapping[str, str] | None = None, name: str | None = None,
                  start_ms: int | None = None, end_ms: int | None = None) -> str | None:
        """A finished child run for trial `number`, named `name` (default ``trial <number>``); its id, or None
        while an outage keeps it queued.

        Args:
            state: the Optuna state name (COMPLETE, PRUNED, FAIL); tag ``state`` and the run's status (`_status`).
            start_ms, end_ms: when the trial's evaluation started and ended (ms since the epoch; default now),
                so the run's duration is the trial's.
        """
        from mlflow.entities import Metric, Param

        if self.run_id is None:
            raise StridelabError("Tracker.start must come before log_trial")
        end_ms = _now_ms() if end_ms is None else int(end_ms)
        start_ms = end_ms if start_ms is None else int(start_ms)
        parent = self.run_id
        tags = {"mlflow.parentRunId": parent, "trial": str(number), "state": state, **dict(tags or {})}
        ms = [Metric(k, float(v), end_ms, 0) for k, v in metrics.items() if v is not None]
        ps = [Param(k, _param(v)) for k, v in params.items()]
        done: dict[str, Any] = {}  # the steps already written, so that a replay continues where it failed

        def write() -> None:
            if "run" not in done:
                found = self._child(parent, number) if done.get("tried") else None
                done["tried"] = True
                done["run"] = found or self.client.create_run(
                    self.experiment_id, run_name=name or f"trial {number}", start_time=start_ms, tags=tags).info.run_id
            if "data" not in done:
                self.client.log_batch(done["run"], metrics=ms, params=ps)
                done["data"] = True
            self.client.set_terminated(done["run"], _status(state), end_time=end_ms)
        self._write(write)
        return done.get("run")

    def _child(self, parent: str, number: int) -> str | None:
        """The child run of trial `number` under `parent`, when a create whose answer was lost made one."""
        runs = self.client.search_runs([self.experiment_id],
                                       f"tags.mlflow.parentRunId = '{parent}' and tags.trial = '{number}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now, run_id = _now_ms(), self.run_id
        ms = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(ms), 500):
            self._write(lambda chunk=ms[i : i + 500]: self.client.log_batch(run_id, metrics=chunk))

    def set_tag(self, key: str, value: str) -> None:
        run_id = self.run_id
        self._write(lambda: self.client.set_tag(run_id, key, value))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        run_id = self.run_id
        self._write(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

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
