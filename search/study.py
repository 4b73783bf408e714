"""Optuna plumbing for sweeps: samplers by name, storage from a URL or path, create/resume a study.

Storage (`make_storage`):
    - a path (default ``<out-dir>/optuna.journal``): ``JournalStorage(JournalFileBackend(path))``, no server;
    - any RDB URL (``sqlite:///study.db``, ``postgresql://user@host/db``): ``RDBStorage(url)`` with `rdb_engine_kwargs` (SQLite waits out another writer's lock).

Resume semantics (`open_study`, `finished_count`):
    - ``--trials N`` counts every finished trial of the study: warm starts (baselines, dp) included, and
      COMPLETE, PRUNED and FAIL alike, so a resumed study ends with exactly N finished trials.
    - A RUNNING trial found on resume was left by a driver that died (a resumed study assumes it is the
      only driver; ask/tell has no heartbeat). It is marked FAIL with user attr ``stale = True`` and not
      counted, so the study then holds N counted trials plus those stale ones.
    - Creating a study whose name exists needs ``resume=True``; resuming checks that the model, NFE,
      space and objective recorded on the study match.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline.errors import StridelabError

SAMPLERS = ("tpe", "gp", "cmaes", "nsga2", "random")
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def make_sampler(name: str, seed: int, multi_objective: bool = False, source_trials: list | None = None,
                 n_startup_trials: int = 8) -> optuna.samplers.BaseSampler:
    """A seeded Optuna sampler by name (``SAMPLERS``).

    Args:
        source_trials: for ``cmaes``, finished warm-start trials: WS-CMA-ES (Nomura et al. 2021) starts
            from a Gaussian fitted to the best of them (from the best one when fewer than 10) instead of the
            middle of the box.
        n_startup_trials: random trials before TPE / GP model the history (warm starts count).
    """
    if name not in SAMPLERS:
        raise StridelabError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=n_startup_trials)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    if name == "cmaes":
        if multi_objective:
            raise StridelabError("sampler cmaes is single-objective; use nsga2, tpe or random for two objectives")
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise StridelabError("sampler cmaes needs the `cmaes` package (pip install cmaes)") from None
        import warnings

        src = [t for t in (source_trials or []) if t.values]
        kw: dict[str, Any] = {}
        if len(src) >= 10:  # WS-CMA-ES keeps the best 10 %: it needs at least 10 source trials
            kw["source_trials"] = src
        elif src:  # too few for WS-CMA-ES: start at the best one (x0, deprecated in Optuna 4.9)
            kw.update(x0=dict(min(src, key=lambda t: t.values[0]).params), sigma0=0.2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=0, warn_independent_sampling=False, **kw)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


SQLITE_BUSY_TIMEOUT_S = 60.0
"""How long a write to an SQLite study waits for another writer's lock before "database is locked" (sqlite3's
default is 5 s)."""


def rdb_engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine settings that ride out a storage blip: SQLite waits `SQLITE_BUSY_TIMEOUT_S` for a lock;
    a server database checks each pooled connection before use (``pool_pre_ping``), so one dropped while the
    server restarted is replaced instead of failing the next write."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    return {"pool_pre_ping": True}


def make_storage(spec: str | os.PathLike) -> optuna.storages.BaseStorage:
    """JournalStorage for a file path, RDBStorage for a URL (``sqlite:///``, ``postgresql://``, ...), with
    `rdb_engine_kwargs`."""
    spec = str(spec)
    if "://" in spec:
        try:
            return optuna.storages.RDBStorage(spec, engine_kwargs=rdb_engine_kwargs(spec))
        except (ImportError, ModuleNotFoundError) as e:
            raise StridelabError(f"storage {spec!r} needs a database driver: {e}") from None
    path = Path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def missing_store(spec: str | os.PathLike) -> Path | None:
    """The local file behind an Optuna storage or MLflow tracking spec (a path or ``sqlite:///`` URL) when it
    does not exist, else None. Opening such a store creates it: check first where it must already exist."""
    spec = str(spec)
    if spec.startswith("sqlite:///"):
        path = Path(spec[len("sqlite:///"):])
    elif "://" in spec:
        return None  # a server: cannot tell without connecting
    else:
        path = Path(spec)
    return None if path.is_file() else path


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def study_exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    return name in study_names(storage)


def no_study_message(name: str | None, names: list[str]) -> str:
    """'no study named X in this storage (it has 'a', 'b'); ...': the studies the storage does have."""
    have = f"it has {', '.join(repr(n) for n in names)}" if names else "it has no studies yet"
    return f"no study named {name!r} in this storage ({have}); pass one of them as `study_name`"


IDENTITY_PARAMS = {"model": "`model`", "nfe": "`nfe`", "solver": "`solver`", "space": "`space`",
                   "objective": "`objective`", "tuning_seeds": "`seed` / `num_seeds`", "teacher_nfe": "`teacher_nfe`",
                   "num_train_timesteps": "`model` (its checkpoint)", "alphas_cumprod_sha256": "`model` (its checkpoint)",
                   "data_sha256": "`data` (its images)"}
"""The parameters behind each identity key a resumed study checks, so a mismatch names what to change."""


def set_objective_names(study: optuna.Study, names: list[str]) -> None:
    """Name the study's objectives (optuna-dashboard then labels its plots "recon", not "Objective 0")."""
    import warnings

    if study.metric_names == names:
        return
    with warnings.catch_warnings():  # experimental in some Optuna releases
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)


LEGACY_IDENTITY = {"solver": "ddim"}
"""What a study made before a setting was recorded ran with (every sweep ran DDIM before solvers existed)."""


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    directions: list[str],
    sampler: optuna.samplers.BaseSampler,
    identity: Mapping[str, Any],
    resume: bool,
    metric_names: list[str] | None = None,
) -> optuna.Study:
    """Create `name`, or load it when `resume` (checking `identity` against what the study recorded).

    `metric_names`: one per direction, recorded on the study (`set_objective_names`)."""
    names = study_names(storage)
    exists = name in names
    if exists and not resume:
        raise StridelabError(f"study {name!r} already exists in this storage; pass `resume` or a new `study_name`")
    if not exists and resume:
        raise StridelabError(f"`resume`: {no_study_message(name, names)}")
    if not exists:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler)
        for k, v in identity.items():
            study.set_user_attr(k, v)
        if metric_names:
            set_objective_names(study, metric_names)
        return study
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    recorded = {**LEGACY_IDENTITY, **study.user_attrs}
    diffs = [f"{IDENTITY_PARAMS.get(k, k)}: study has {recorded.get(k)!r}, asked {v!r}"
             for k, v in identity.items() if recorded.get(k) != v]
    if diffs:
        raise StridelabError(f"`resume`: study {name!r} was made with other settings ({'; '.join(diffs)}); "
                             "pass the study's values, or a new `study_name`")
    if [d.name.lower() for d in study.directions] != directions:
        raise StridelabError(f"`resume`: study {name!r} has directions {study.directions}, asked {directions}")
    if metric_names:
        set_objective_names(study, metric_names)  # a study made before objectives were named
    return study


def fail_stale_running(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials (left by a killed driver) FAIL with user attr ``stale`` and enqueue each again
    with its params and user attrs; returns their numbers.

    Enqueued, they are the first trials the resumed sweep asks: it evaluates exactly the batch the killed
    driver had asked, so its study is the undisturbed run's (the sweep reseeds its sampler per batch).
    """
    stale = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        if t.state == TrialState.WAITING:
            continue  # enqueued, never started: the next ask() picks it up
        _set_running_user_attr(study, t, "stale", True)  # before tell: a finished trial takes no attrs
        study.tell(t.number, state=TrialState.FAIL)
        stale.append(t.number)
        if t.params:  # none when the driver died between ask and suggest: the sampler asks anew
            study.enqueue_trial(dict(t.params), user_attrs={k: v for k, v in t.user_attrs.items() if k != "stale"})
    return stale


def _set_running_user_attr(study: optuna.Study, trial: optuna.trial.FrozenTrial, key: str, value: Any) -> None:
    """Set a user attr on a RUNNING trial that another (dead) process asked.

    Optuna has no public call for this: `Trial.set_user_attr` needs the `Trial` object of the process that
    asked the trial, and `FrozenTrial` is a read-only copy; only the storage can, keyed by the trial id.
    """
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def enqueued_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The params a WAITING trial was enqueued with (``study.enqueue_trial``); empty for other trials.

    Optuna exposes them only through the system attr it keeps them in until the trial is asked.
    """
    return dict(trial.system_attrs.get("fixed_params", {}))


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards --trials: COMPLETE, PRUNED and FAIL, except stale ones."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=COUNTED_STATES) if not t.user_attrs.get("stale"))
