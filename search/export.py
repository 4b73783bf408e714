"""Exported schedules and sweep tables.

An exported schedule is `Schedule.to_dict()` plus the fields a user of another codebase needs at the top
level, and the same fields again in ``meta`` so `Schedule.load(path)` carries them:

=========================  ===================================================================
``timesteps``              descending ints (what DDIM visits), len = ``nfe``
``sigmas``                 n + 1 k-diffusion sigmas sqrt((1 - abar) / abar), ending in 0
``num_train_timesteps``    T of the model
``nfe``                    number of steps
``model``                  the model spec it was tuned on (e.g. ``gmm:blobs64``)
``alphas_cumprod_sha256``  sha256 of the model's ``alphas_cumprod`` as little-endian float64 bytes
``metrics``                tuning / held-out metrics
``provenance``             study, storage, MLflow run id, stridelab version, date
=========================  ===================================================================

`check_schedule_for_model` refuses (or, when allowed, warns about) a schedule tuned for another noise
schedule: the same integer timesteps mean different noise levels under another ``alphas_cumprod``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import StridelabError
from pipeline.interop.apply import alphas_cumprod_sha256, check_compatible  # noqa: F401  (re-exported: the export's model fingerprint)
from pipeline.io.files import atomic_write_json
from pipeline.core.schedules import Schedule

EXPORT_FIELDS = ("timesteps", "sigmas", "num_train_timesteps", "nfe", "model", "alphas_cumprod_sha256",
                 "metrics", "provenance")


def provenance(**fields: Any) -> dict[str, Any]:
    """Provenance record: the given fields plus stridelab version and UTC date."""
    out = {k: v for k, v in fields.items() if v is not None}
    out.setdefault("stridelab_version", __version__)
    out.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return out


def export_dict(
    schedule: Schedule,
    *,
    model: str,
    sigmas: Sequence[float],
    alphas_hash: str,
    metrics: Mapping[str, Any] | None = None,
    prov: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The exported JSON object (see the module docstring)."""
    sig = [float(s) for s in sigmas]
    if len(sig) != schedule.nfe + 1 or sig[-1] != 0.0:
        raise StridelabError(f"sigmas must have nfe + 1 = {schedule.nfe + 1} values ending in 0, got {len(sig)}")
    fields = {
        "sigmas": sig,
        "model": model,
        "alphas_cumprod_sha256": alphas_hash,
        "metrics": dict(metrics or {}),
        "provenance": provenance(**dict(prov or {})),
    }
    meta = {**dict(schedule.meta), **fields}
    base = Schedule(schedule.timesteps, schedule.num_train_timesteps, schedule.name, schedule.params, meta).to_dict()
    return {**base, **fields}


def export_for_model(schedule: Schedule, model: Any, metrics: Mapping[str, Any] | None = None,
                     prov: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`export_dict` with sigmas and hash computed from a loaded model (`pipeline.models.load.LoadedModel`)."""
    return export_dict(schedule, model=model.spec, sigmas=schedule.sigmas(model.alphas_cumprod).tolist(),
                       alphas_hash=alphas_cumprod_sha256(model.alphas_cumprod), metrics=metrics, prov=prov)


def write_export(path: str | os.PathLike, obj: Mapping[str, Any]) -> Path:
    """Write an export atomically, after checking it loads back as a `Schedule`."""
    Schedule.from_dict(obj)
    return atomic_write_json(path, dict(obj))


def check_schedule_for_model(schedule: Schedule, model: Any, allow: bool = False) -> None:
    """Raise `StridelabError` when `schedule` was exported for another ``alphas_cumprod`` than `model`'s.

    The policy is `pipeline.interop.apply.check_compatible`'s; a file without a hash also warns.

    Args:
        schedule: e.g. ``Schedule.load("schedule.json")`` of an exported file.
        model: a `LoadedModel` (``alphas_cumprod``, ``spec``).
        allow: warn instead of raising on a hash mismatch (a different T always raises).
    """
    check_compatible(schedule, model.alphas_cumprod, what=f"model {model.spec}", allow_other_model=allow,
                     warn_unhashed=True)


# --------------------------------------------------------------------------------------------------
# From a study / an MLflow run


def schedule_of_trial(trial: Any, num_train_timesteps: int) -> Schedule:
    """The exact schedule a trial evaluated (stored in its user attrs, never rebuilt from params)."""
    ua = trial.user_attrs
    if "timesteps" not in ua:
        raise StridelabError(f"trial {trial.number} has no recorded schedule")
    return Schedule(tuple(ua["timesteps"]), num_train_timesteps, ua.get("schedule", "learned"), dict(trial.params))


def trials_table(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, kind, schedule name, params (JSON), timesteps, metrics."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        vals = t.values or []
        rows.append({
            "trial": t.number,
            "state": t.state.name,
            "kind": ua.get("kind", "search"),
            "schedule": ua.get("schedule", ""),
            "params": json.dumps(t.params, sort_keys=True),
            "timesteps": [int(v) for v in ua.get("timesteps", [])],
            "value": float(vals[0]) if vals else None,
            "value2": float(vals[1]) if len(vals) > 1 else None,
            "recon": ua.get("recon"),
            "fid": ua.get("fid"),
            "screen_recon": ua.get("screen_recon"),
            "seconds": ua.get("seconds"),
            "error": ua.get("error"),
        })
    return rows


def write_trials_parquet(study: Any, path: str | os.PathLike) -> Path:
    """Every schedule of a sweep as a Parquet table (pyarrow), written atomically."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io.files import atomic_write_bytes

    schema = pa.schema([
        ("trial", pa.int64()), ("state", pa.string()), ("kind", pa.string()), ("schedule", pa.string()),
        ("params", pa.string()), ("timesteps", pa.list_(pa.int64())), ("value", pa.float64()),
        ("value2", pa.float64()), ("recon", pa.float64()), ("fid", pa.float64()), ("screen_recon", pa.float64()),
        ("seconds", pa.float64()), ("error", pa.string()),
    ])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(trials_table(study), schema=schema), buf)
    return atomic_write_bytes(path, buf.getvalue())


def best_trial(study: Any) -> Any:
    """The best COMPLETE trial; for two objectives, the Pareto trial with the least log(recon) + log(fid)."""
    import math

    if len(study.directions) == 1:
        try:
            return study.best_trial
        except ValueError:
            raise StridelabError(f"study {study.study_name!r} has no complete trial") from None
    front = study.best_trials
    if not front:
        raise StridelabError(f"study {study.study_name!r} has no complete trial")
    return min(front, key=lambda t: sum(math.log(max(v, 1e-300)) for v in t.values))


def trial_by_number(study: Any, number: int) -> Any:
    """Trial `number` of `study`, which must be COMPLETE (a pruned or failed trial has no full metrics)."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise StridelabError(f"study {study.study_name!r} has no trial {number} (trials 0..{len(trials) - 1})")
    t = trials[number]
    if t.state.name != "COMPLETE":
        raise StridelabError(f"trial {number} of study {study.study_name!r} is {t.state.name}, not COMPLETE")
    return t


def export_from_study(study: Any, out: str | os.PathLike, storage_url: str | None = None,
                      trial: int | None = None) -> Path:
    """Export the best trial of a sweep study, or trial number `trial` (e.g. another point of a Pareto front);
    model, T and hash come from the study's user attrs."""
    ua = study.user_attrs
    missing = [k for k in ("model", "num_train_timesteps", "alphas_cumprod_sha256") if k not in ua]
    if missing:
        raise StridelabError(f"study {study.study_name!r} was not made by stridelab sweep (no {', '.join(missing)})")
    t = best_trial(study) if trial is None else trial_by_number(study, trial)
    sched = schedule_of_trial(t, int(ua["num_train_timesteps"]))
    sched = Schedule(sched.timesteps, sched.num_train_timesteps, "learned" if t.user_attrs.get("kind") != "baseline"
                     else sched.name, {"space": ua.get("space"), **sched.params})
    metrics = {k: t.user_attrs[k] for k in ("recon", "fid") if t.user_attrs.get(k) is not None}
    prov = provenance(study=study.study_name, storage=storage_url, trial=t.number,
                      mlflow_run_id=(ua.get("mlflow_parent_runs") or [None])[-1])
    obj = export_dict(sched, model=ua["model"], sigmas=t.user_attrs["sigmas"], alphas_hash=ua["alphas_cumprod_sha256"],
                      metrics=metrics, prov=prov)
    return write_export(out, obj)


def export_from_run(run_id: str, out: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """Export the best schedule logged by a sweep's parent MLflow run (artifact ``best_schedule.json``)."""
    import tempfile

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from search.study import missing_store

    if tracking_uri and missing_store(tracking_uri) is not None:  # MlflowClient would create an empty store
        raise StridelabError(f"no MLflow run {run_id!r}: {missing_store(tracking_uri)} does not exist")
    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise StridelabError(f"no MLflow run {run_id!r} at {client.tracking_uri}") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, "best_schedule.json", tmp)
        except (MlflowException, OSError):
            raise StridelabError(f"run {run_id} has no best_schedule.json artifact: pass the sweep's parent run id") from None
        obj = json.loads(Path(local).read_text(encoding="utf-8"))
    prov = dict(obj.get("provenance", {}))
    prov.update(mlflow_run_id=run_id, exported=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    obj["provenance"] = prov
    obj.setdefault("meta", {})["provenance"] = prov
    return write_export(out, obj)
