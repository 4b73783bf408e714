"""Exported schedules and sweep tables.

An exported schedule is `Schedule.to_dict()` plus the fields a user of another codebase needs at the top
level, and the same fields again in ``meta`` so `Schedule.load(path)` carries them:

=========================  ===================================================================
``timesteps``              descending ints (what DDIM visits), len = ``nfe``
``inverse_timesteps``      optional: the ascending ints DDIM inversion walks, only where they are not
                           ``timesteps`` reversed (an encoder tuned apart from the decoder)
``sigmas``                 n + 1 k-diffusion sigmas sqrt((1 - abar) / abar), ending in 0
``num_train_timesteps``    T of the model
``nfe``                    number of steps
``model``                  the model spec it was tuned on (e.g. ``gmm:blobs64``)
``alphas_cumprod_sha256``  sha256 of the model's ``alphas_cumprod`` as little-endian float64 bytes
``metrics``                tuning / held-out metrics
``provenance``             study, storage, MLflow run id, stridelab version, date
``solver``                 what it was tuned with (`SolverSpec.record`): name, order, evaluations per
                           step, diffusers class + config (final-step handling included), k-diffusion
                           and ComfyUI sampler names; ``assumed`` says when that is DDIM by default
=========================  ===================================================================

Besides that file (``stridelab``), `downstream` turns an export into what another tool reads
(`FORMATS`): ``comfyui`` (the ManualSigmas string and the KSamplerSelect sampler name for SamplerCustom)
and ``k-diffusion`` (the ``sample_*`` function name and its sigmas).

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
from pipeline.interop.apply import alphas_cumprod_sha256, check_compatible, warn_if_shift_dropped  # noqa: F401  (re-exported: the export's model fingerprint)
from pipeline.interop.reuse import solver_record
from pipeline.interop.sigma_lists import comfyui_sigma_string
from pipeline.io.files import atomic_write_json
from pipeline.core.schedules import INVERSE_MODEL_SHIFT_KEY, MODEL_SHIFT_KEY, Schedule
from pipeline.solvers.registry import DEFAULT_SOLVER

EXPORT_FIELDS = ("timesteps", "sigmas", "num_train_timesteps", "nfe", "model", "alphas_cumprod_sha256",
                 "metrics", "provenance", "solver")

FORMATS = ("stridelab", "comfyui", "k-diffusion")
"""What `write_export` can write: the stridelab export itself, or `downstream` of it."""

ASSUMED_SOLVER = (f"{DEFAULT_SOLVER}: no solver recorded (made before stridelab had several solvers, when every "
                  "sweep ran DDIM)")
"""The ``assumed`` note of a solver record that is the default, not a recorded one."""


def export_solver(schedule: Schedule, solver: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The solver record an export stores: `solver` (a registered name or a record), else the schedule's
    ``meta["solver"]``, else DDIM with an ``assumed`` note (schedules and studies from before solvers)."""
    if solver is None:
        solver = schedule.meta.get("solver")
    if solver is None:
        return {**solver_record(DEFAULT_SOLVER), "assumed": ASSUMED_SOLVER}
    return solver_record(solver)


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
    solver: str | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The exported JSON object (see the module docstring); `solver` as for `export_solver`."""
    sig = [float(s) for s in sigmas]
    if len(sig) != schedule.nfe + 1 or sig[-1] != 0.0:
        raise StridelabError(f"sigmas must have nfe + 1 = {schedule.nfe + 1} values ending in 0, got {len(sig)}")
    fields = {
        "sigmas": sig,
        "model": model,
        "alphas_cumprod_sha256": alphas_hash,
        "metrics": dict(metrics or {}),
        "provenance": provenance(**dict(prov or {})),
        "solver": export_solver(schedule, solver),
    }
    meta = {**dict(schedule.meta), **fields}
    base = Schedule(schedule.timesteps, schedule.num_train_timesteps, schedule.name, schedule.params, meta,
                    schedule.inverse_timesteps).to_dict()
    return {**base, **fields}


def export_for_model(schedule: Schedule, model: Any, metrics: Mapping[str, Any] | None = None,
                     prov: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`export_dict` with sigmas and hash computed from a loaded model (`pipeline.models.load.LoadedModel`)."""
    return export_dict(schedule, model=model.spec, sigmas=schedule.sigmas(model.alphas_cumprod).tolist(),
                       alphas_hash=alphas_cumprod_sha256(model.alphas_cumprod), metrics=metrics, prov=prov)


def downstream(obj: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """An export as another tool takes it (`FORMATS`); every format keeps timesteps, T, model hash and the
    solver record, so `Schedule.from_dict` reads each back.

    ``comfyui``: ``sigmas`` is the string for a ManualSigmas node feeding SamplerCustom's ``sigmas`` and
    ``sampler_name`` the KSamplerSelect choice feeding its ``sampler``. ``k-diffusion``: ``sampler`` is the
    ``k_diffusion.sampling`` function, called as ``sampler(model, x, torch.tensor(sigmas))`` with
    ``x = randn * sigmas[0]``.

    Raises:
        StridelabError: an unknown format, or a solver with no sampler in that tool.
    """
    if fmt not in FORMATS:
        raise StridelabError(f"must be one of {', '.join(FORMATS)}, got {fmt!r}", param="fmt")
    if fmt == "stridelab":
        return dict(obj)
    sched = Schedule.from_dict(obj)
    warn_if_shift_dropped(sched, f"a {fmt} sigma list", stacklevel=4)
    rec = export_solver(sched)
    sigmas = [float(v) for v in obj.get("sigmas", [])]
    if len(sigmas) != sched.nfe + 1:
        raise StridelabError(f"the export has no sigmas for its {sched.nfe} steps (n + 1 = {sched.nfe + 1} values)")
    key, tool = {"comfyui": ("comfyui", "ComfyUI"), "k-diffusion": ("k_diffusion", "k-diffusion")}[fmt]
    if not rec.get(key):
        others = [f"{t} {rec[k]}" for t, k in (("diffusers", "diffusers_class"), ("ComfyUI", "comfyui"),
                                               ("k-diffusion", "k_diffusion")) if k != key and rec.get(k)]
        raise StridelabError(f"solver {rec['name']!r} has no {tool} sampler; use {', '.join(others) or 'stridelab'}")
    common = {"name": sched.name, "nfe": sched.nfe, "num_train_timesteps": sched.num_train_timesteps,
              "timesteps": list(sched.timesteps), "model": obj.get("model"),
              "alphas_cumprod_sha256": obj.get("alphas_cumprod_sha256"), "solver": rec}
    if fmt == "comfyui":
        return {"format": "stridelab.schedule.comfyui/1", "sampler_name": rec["comfyui"],
                "sigmas": comfyui_sigma_string(sigmas),
                "nodes": "ManualSigmas(sigmas) -> SamplerCustom.sigmas; KSamplerSelect(sampler_name) -> "
                         "SamplerCustom.sampler",
                **common}
    return {"format": "stridelab.schedule.k-diffusion/1", "sampler": rec["k_diffusion"], "sigmas": sigmas,
            "call": "getattr(k_diffusion.sampling, sampler)(model, torch.randn(shape) * sigmas[0], torch.tensor(sigmas))",
            **common}


def write_export(path: str | os.PathLike, obj: Mapping[str, Any], fmt: str = "stridelab") -> Path:
    """Write an export (as `downstream` format `fmt`) atomically, after checking it loads back as a `Schedule`."""
    out = downstream(obj, fmt)
    Schedule.from_dict(out)
    return atomic_write_json(path, out)


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
    # a time-shift trial ran its steps with these shifts (search.sweep.loop): the decoder's, and the encoder's
    # with the inversion objective
    meta = {k: list(ua[k]) for k in (MODEL_SHIFT_KEY, INVERSE_MODEL_SHIFT_KEY) if ua.get(k) is not None}
    return Schedule(tuple(ua["timesteps"]), num_train_timesteps, ua.get("schedule", "learned"), dict(trial.params), meta)


def study_solver(study: Any, trial: Any | None = None) -> str | None:
    """The solver name a trial (its ``solver`` user attr) or else the study ran; None for older studies."""
    name = trial.user_attrs.get("solver") if trial is not None else None
    return name if name is not None else study.user_attrs.get("solver")


def trials_table(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, kind, schedule name, solver, params (JSON), timesteps, metrics."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        vals = t.values or []
        rows.append({
            "trial": t.number,
            "state": t.state.name,
            "kind": ua.get("kind", "search"),
            "schedule": ua.get("schedule", ""),
            "solver": study_solver(study, t) or DEFAULT_SOLVER,
            "params": json.dumps(t.params, sort_keys=True),
            "timesteps": [int(v) for v in ua.get("timesteps", [])],
            "value": float(vals[0]) if vals else None,
            "value2": float(vals[1]) if len(vals) > 1 else None,
            "recon": ua.get("recon"),
            "fid": ua.get("fid"),
            "inversion": ua.get("inversion"),
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
        ("solver", pa.string()), ("params", pa.string()), ("timesteps", pa.list_(pa.int64())), ("value", pa.float64()),
        ("value2", pa.float64()), ("recon", pa.float64()), ("fid", pa.float64()), ("inversion", pa.float64()),
        ("screen_recon", pa.float64()),
        ("seconds", pa.float64()), ("error", pa.string()),
    ])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(trials_table(study), schema=schema), buf)
    return atomic_write_bytes(path, buf.getvalue())


def best_trial(study: Any, selected: bool = True) -> Any:
    """The trial a sweep exports: the one it chose on its validation seeds (study user attr ``selected_trial``,
    `search.sweep.select`) when `selected` and recorded, else the best COMPLETE trial; for two objectives, the
    Pareto trial with the least log(recon) + log(fid)."""
    import math

    if selected and study.user_attrs.get("selected_trial") is not None:
        return trial_by_number(study, int(study.user_attrs["selected_trial"]))
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
                      trial: int | None = None, fmt: str = "stridelab") -> Path:
    """Export the best trial of a sweep study, or trial number `trial` (e.g. another point of a Pareto front),
    as `fmt` (`FORMATS`); model, T, hash and solver come from the study's user attrs (no ``solver``: a study
    from before solvers were recorded, DDIM, and the record says it was assumed)."""
    ua = study.user_attrs
    missing = [k for k in ("model", "num_train_timesteps", "alphas_cumprod_sha256") if k not in ua]
    if missing:
        raise StridelabError(f"study {study.study_name!r} was not made by stridelab sweep (no {', '.join(missing)})")
    t = best_trial(study) if trial is None else trial_by_number(study, trial)
    sched = schedule_of_trial(t, int(ua["num_train_timesteps"]))
    sched = Schedule(sched.timesteps, sched.num_train_timesteps, "learned" if t.user_attrs.get("kind") != "baseline"
                     else sched.name, {"space": ua.get("space"), **sched.params}, sched.meta)  # meta: a time shift
    metrics = {k: t.user_attrs[k] for k in ("recon", "fid") if t.user_attrs.get(k) is not None}
    prov = provenance(study=study.study_name, storage=storage_url, trial=t.number,
                      mlflow_run_id=(ua.get("mlflow_parent_runs") or [None])[-1])
    obj = export_dict(sched, model=ua["model"], sigmas=t.user_attrs["sigmas"], alphas_hash=ua["alphas_cumprod_sha256"],
                      metrics=metrics, prov=prov, solver=study_solver(study, t))
    return write_export(out, obj, fmt)


def export_from_run(run_id: str, out: str | os.PathLike, tracking_uri: str | None = None,
                    fmt: str = "stridelab") -> Path:
    """Export the best schedule logged by a sweep's parent MLflow run (artifact ``best_schedule.json``) as
    `fmt`; an artifact from before solvers were recorded gets DDIM's record, marked assumed."""
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
    meta = obj.setdefault("meta", {})
    meta["provenance"] = prov
    obj["solver"] = meta["solver"] = export_solver(Schedule.from_dict(obj))
    return write_export(out, obj, fmt)
