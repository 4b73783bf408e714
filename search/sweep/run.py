"""`run_sweep`: one sweep end to end, as a list of named steps (see `search.sweep` for the flow)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import optuna

from pipeline.core.schedules import Schedule, check_nfe
from pipeline.distributed.cluster import check_placement_timeout, parse_actor_resources
from pipeline.errors import StridelabError
from pipeline.io.console import progress
from pipeline.models.load import LoadedModel
from search.evaluators import EvaluatorFactory, Objective, TrialFailed
from search.study import fail_stale_running, finished_count, make_sampler, make_storage, missing_store, open_study
from search.sweep import holdout, select
from search.sweep.config import HOLDOUT_OFFSET, SweepConfig, SweepResult
from search.sweep.data import LoaderWithData, SweepData, attach, load_sweep_data
from search.sweep.loop import Sweep
from search.sweep.pruning import safe_evaluate
from search.sweep.outputs import HeldOut, log_to_tracker, print_summary, sweep_provenance, write_files

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_sweep(
    cfg: SweepConfig,
    *,
    study_name: str | None = None,
    storage: str | None = None,
    resume: bool = False,
    out_dir: str | Path = "results/sweep",
    tracking_uri: str | None = None,
    experiment: str | None = None,
    track: bool = True,
    actors: int = 0,
    ray_address: str | None = None,
    gpus_per_actor: float | None = None,
    actor_resources: dict[str, float] | None = None,
    placement_timeout: float | None = None,
    model: LoadedModel | None = None,
    evaluators: Callable[[Sequence[int]], Any] | None = None,
    figures: bool = True,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run (or resume) a sweep end to end; see `search.sweep`.

    Args:
        cfg: the sweep's settings.
        study_name: default: model, NFE, space, objective and a timestamp.
        storage: Optuna storage, a journal file path or an RDB URL (default ``<out_dir>/optuna.journal``).
        resume: continue `study_name` up to ``cfg.trials`` trials in total.
        out_dir: root of the outputs; this sweep writes into ``<out_dir>/<study_name>/``.
        tracking_uri, experiment: MLflow (default sqlite in the working directory); `track` False: none.
        actors, ray_address: the evaluator (0 = in this process).
        gpus_per_actor: GPUs each actor requests as given (autoscaling clusters; see `EvaluatorFactory`).
        actor_resources: custom Ray resources each actor requests (actors only on nodes that have them).
        placement_timeout: seconds to wait while no live node can host the actors before stopping with
            `PlacementTimeout` (the study stays as it was; resume it once a node is back); default 600, 0: no limit.
        model: an already loaded model (default: ``load_model(cfg.model)``).
        evaluators: ``seeds -> evaluator`` (default `EvaluatorFactory`); tests inject stand-ins here.
        figures: draw the plots and sample grids (the JSON, CSV and Parquet outputs are always written).
    """
    from pipeline.models.load import load_model

    t_start = time.perf_counter()
    storage_spec = storage or str(Path(out_dir) / "optuna.journal")
    missing = missing_store(storage_spec) if resume else None
    if missing is not None:  # before opening it, which would create an empty store
        raise StridelabError(f"`resume`: no study named {study_name!r}: {missing} does not exist")
    model = model or load_model(cfg.model, dtype=cfg.dtype)
    check_nfe(cfg.steps, model.num_train_timesteps)
    objective = Objective(cfg.objective, cfg.fid_weight)
    data = None
    if cfg.data is not None:
        cfg, data = _user_data(cfg, model, log)
    _check_data(cfg, model, objective)
    if cfg.method == "gradient":  # the distance must fit the model's samples: checked before the first teacher
        from pipeline.evaluation.distances import make_distance

        make_distance(cfg.grad_loss, model.data_range, model.sample_shape)
    study_name = study_name or default_study_name(cfg)
    study = _open_study(cfg, model, storage_spec, study_name, resume, objective, log,
                        data_digest=data.digest if data is not None else None)
    run_dir = Path(out_dir) / study_name
    run_dir.mkdir(parents=True, exist_ok=True)
    placement = {"actor_resources": parse_actor_resources(actor_resources),
                 "placement_timeout": check_placement_timeout(placement_timeout)}
    tracker = _start_tracking(cfg, study, study_name, storage_spec, resume, actors, gpus_per_actor,
                              tracking_uri, experiment, log, placement) if track else None
    factory = None
    if evaluators is None:
        factory = evaluators = _evaluator_factory(cfg, model, actors, ray_address, gpus_per_actor, objective, log,
                                                  placement, loader=LoaderWithData(data) if data is not None else None)
    status = "FAILED"
    try:
        t0 = time.perf_counter()
        sweep = Sweep(cfg, model, evaluators, study, tracker, log)
        log(f"study {study_name} ({storage_spec}): {finished_count(study)} trials so far; "
            f"teachers on {cfg.num_seeds} tuning seeds: {time.perf_counter() - t0:.1f} s")
        sweep.warm_start()
        sweep.search()
        sweep.shift_refine()
        _log_budget(cfg, study, tracker, log)
        for ev in {id(e): e for e in (sweep.screen, sweep.rest) if e is not None}.values():
            if factory is not None:
                factory.release(ev)  # the search is over: free its actors for the validation and held-out pools
        selection, pair = _select(cfg, model, study, factory, evaluators, log, tracker)
        held = _held_out(cfg, model, study, selection, factory, evaluators, log, pair)
        prov = sweep_provenance(cfg, study_name, storage_spec, held.best_trial.number,
                                tracker.run_id if tracker else None, held)
        written = write_files(cfg, model, study, held, run_dir, prov, objective.multi, figures)
        if tracker is not None:
            log_to_tracker(tracker, written, held)
        status = "FINISHED"
        counts = state_counts(study)
        print_summary(log, cfg, held, counts, written, tracker)
        return SweepResult(study_name, held.learned, held.best_trial.number, held.rows, written.export_path, run_dir,
                           tracker.run_id if tracker else None, tracker.tracking_uri if tracker else None,
                           time.perf_counter() - t_start, counts)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.end(status, story=_end_story(status, study, cfg.trials))
        if factory is not None:
            factory.close()


def _user_data(cfg: SweepConfig, model: LoadedModel, log: Callable[[str], None]) -> tuple[SweepConfig, SweepData]:
    """Read and split the user's images (`search.sweep.data`), make `model` draw them, and size the three seed
    ranges to the three parts (each part is used whole)."""
    data = load_sweep_data(cfg.data, model.sample_shape, model.data_range, cfg.seed, HOLDOUT_OFFSET)
    attach(model, data)
    n = data.counts()
    log(f"data: {sum(n.values())} images from {cfg.data}: {n['tuning']} tuning, {n['validation']} validation, "
        f"{n['holdout']} held-out (these set the three seed counts)")
    return replace(cfg, num_seeds=n["tuning"], validation_seeds=n["validation"], holdout_seeds=n["holdout"]), data


def _check_data(cfg: SweepConfig, model: LoadedModel, objective: Objective) -> None:
    """An inversion objective needs a model that draws real data (``denoiser.sample_data(seeds)``: the digits
    images of `pipeline.models.digits.data_index` for the bundled models, exact draws for ``gmm:``), and every
    seed range must name data: checked before the first trial."""
    if not objective.needs_inversion:
        return
    draw = getattr(model.denoiser, "sample_data", None)
    if not callable(draw):
        raise StridelabError(f"`objective` {cfg.objective} round-trips real data, but model {cfg.model} has none to "
                             "draw from: use `model` bundled:digits, bundled:digits-v or gmm:<name>, or `objective` recon")
    for seeds in (cfg.tuning_seeds, cfg.validation_seed_list, cfg.holdout_seed_list):
        if seeds:
            draw(seeds)


def _open_study(cfg: SweepConfig, model: LoadedModel, storage_spec: str, study_name: str, resume: bool,
                objective: Objective, log: Callable[[str], None], data_digest: str | None = None) -> optuna.Study:
    """Create (or resume, checking the identity it records and failing stale RUNNING trials) the study."""
    from search import export

    sampler = make_sampler(cfg.sampler, cfg.seed, multi_objective=objective.multi)
    identity = {"model": cfg.model, "nfe": cfg.nfe, "solver": cfg.solver, "space": cfg.space, "objective": cfg.objective,
                "num_train_timesteps": model.num_train_timesteps,
                "alphas_cumprod_sha256": export.alphas_cumprod_sha256(model.alphas_cumprod),
                "tuning_seeds": [cfg.seed, cfg.num_seeds], "teacher_nfe": cfg.teacher_nfe}
    if data_digest is not None:  # the user's images: a resume on other images is refused
        identity["data_sha256"] = data_digest
    study = open_study(make_storage(storage_spec), study_name, objective.directions, sampler, identity, resume,
                       metric_names=cfg.objective.split(","))  # "recon", "recon,fid" -> recon, fid
    stale = fail_stale_running(study) if resume else []
    if stale:
        log(f"resume: trials {stale} were left RUNNING by a stopped driver: marked FAIL, not counted, asked again")
    return study


def _start_tracking(cfg: SweepConfig, study: optuna.Study, study_name: str, storage_spec: str, resume: bool,
                    actors: int, gpus_per_actor: float | None, tracking_uri: str | None, experiment: str | None,
                    log: Callable[[str], None], placement: dict[str, Any] | None = None) -> Any:
    """Start the MLflow parent run, or on resume continue the study's own (found by its study and storage
    tags; runs a killed driver left RUNNING are closed first), and record it on the study. A resumed study
    whose parent is not in this tracking store (another URI) gets a new parent linked by tag
    ``stridelab.resumed_from`` to the ones the study recorded."""
    from pipeline import __version__
    from search.tracking import DEFAULT_EXPERIMENT, Tracker, default_tracking_uri, storage_key

    tracking_uri = tracking_uri or default_tracking_uri()
    tracker = Tracker(tracking_uri, experiment or DEFAULT_EXPERIMENT, log=log)
    params = {**asdict(cfg), "study_name": study_name, "storage": storage_spec, "resume": resume, "actors": actors,
              "gpus_per_actor": gpus_per_actor, "stridelab_version": __version__}
    if placement and placement.get("actor_resources"):
        import json

        params["actor_resources"] = json.dumps(placement["actor_resources"], sort_keys=True)
    identity = {"stridelab.kind": "sweep", "study": study_name, "stridelab.storage": storage_key(storage_spec)}
    previous = study.user_attrs.get("mlflow_parent_runs", [])
    parent, closed = None, []
    if resume:
        closed = tracker.close_stale(previous)  # a driver killed mid-run never ended its MLflow runs
        if closed:
            log(f"resume: MLflow runs {closed} were left RUNNING by a stopped driver: marked KILLED")
        parent = tracker.find_parent(identity)
    done = finished_count(study)
    if parent is not None:
        tracker.reopen(parent, params, f"resumed at {done} of {cfg.trials} trials"
                                       + (" (the previous driver stopped without ending this run)" if parent in closed else ""))
        log(f"resume: continuing MLflow run {parent}")
    else:
        link = {"stridelab.resumed_from": ",".join(previous)} if resume and previous else {}
        story = (f"started: {cfg.trials} trials" if not resume else
                 f"resumed at {done} of {cfg.trials} trials; the study's earlier runs {previous or 'none'} are not in "
                 f"this tracking store (they were in {study.user_attrs.get('mlflow_tracking_uri', 'none recorded')})")
        tracker.start(study_name, params, tags={**identity, **link}, story=story)
    if tracker.run_id not in previous:
        study.set_user_attr("mlflow_parent_runs", [*previous, tracker.run_id])
    study.set_user_attr("mlflow_tracking_uri", tracking_uri)
    return tracker


def _end_story(status: str, study: optuna.Study, trials: int) -> str:
    """The parent run's closing line: how far the study got and why this segment ended."""
    done = finished_count(study)
    if status == "FINISHED":
        return f"finished: {done} of {trials} trials"
    if status == "KILLED":
        return f"interrupted at {done} of {trials} trials (resuming the study continues this run)"
    return f"stopped by an error at {done} of {trials} trials"


def _evaluator_factory(cfg: SweepConfig, model: LoadedModel, actors: int, ray_address: str | None,
                       gpus_per_actor: float | None, objective: Objective,
                       log: Callable[[str], None], placement: dict[str, Any] | None = None,
                       loader: Any = None) -> EvaluatorFactory:
    """The default evaluators: Ray actor pools (or this process) on `model`, with FID when the objective needs it."""
    factory = EvaluatorFactory(model, actors, ray_address, cfg.teacher_nfe, fid=objective.needs_fid, log=log,
                               gpus_per_actor=gpus_per_actor, solver=cfg.solver, dtype=cfg.dtype,
                               inversion=objective.needs_inversion, loader=loader, **(placement or {}))
    log(f"evaluator: {factory.kind}; solver {cfg.solver}, {cfg.steps} steps ({cfg.nfe} model evaluations budget); "
        f"teacher {cfg.teacher_nfe or model.num_train_timesteps}-step DDIM")
    return factory


def _log_budget(cfg: SweepConfig, study: optuna.Study, tracker: Any, log: Callable[[str], None]) -> None:
    """Log (and track as metrics) the counted trials of the study by phase: what ran, not what was asked."""
    ran = budget_counts(study)
    log(f"trials by phase: {ran['warm_starts']} warm starts, {ran['search_trials']} {cfg.sampler}, "
        f"{ran['polish_trials']} polish")
    if tracker is not None:
        tracker.log_metrics(ran)


def budget_counts(study: optuna.Study) -> dict[str, int]:
    """Counted trials (`search.study.finished_count`) by phase: ``warm_starts``, ``search_trials``, ``polish_trials``."""
    from search.study import COUNTED_STATES

    kinds = [t.user_attrs.get("kind", "search") for t in study.get_trials(deepcopy=False, states=COUNTED_STATES)
             if not t.user_attrs.get("stale")]
    return {"warm_starts": kinds.count("baseline"), "search_trials": kinds.count("search"),
            "polish_trials": kinds.count("polish")}


def _select(cfg: SweepConfig, model: LoadedModel, study: optuna.Study, factory: EvaluatorFactory | None,
            evaluators: Callable[[Sequence[int]], Any], log: Callable[[str], None],
            tracker: Any = None) -> tuple[select.Selection, Schedule | None]:
    """The trial to export, chosen on the validation seeds (`search.sweep.select`), and with ``inversion_pair
    joint`` the encoder searched for it (`_joint_pair`; None where the symmetric pair stays); the validation
    pool is closed after."""
    t0 = time.perf_counter()
    ev = evaluators(cfg.validation_seed_list) if cfg.validating else None
    try:
        selection = select.select_trial(cfg, study, ev, model.num_train_timesteps, log)
        pair = None
        if cfg.inversion_pair == "joint":
            pair = _joint_pair(cfg, model, selection, factory, evaluators, ev, log, tracker)
        return selection, pair
    finally:
        if ev is not None:
            log(f"validation (teacher and {len(study.user_attrs.get('validation', {}))} candidates): "
                f"{time.perf_counter() - t0:.1f} s")
            if factory is not None:
                factory.release(ev)


def _joint_pair(cfg: SweepConfig, model: LoadedModel, selection: select.Selection, factory: EvaluatorFactory | None,
                evaluators: Callable[[Sequence[int]], Any], validation: Any, log: Callable[[str], None],
                tracker: Any = None) -> Schedule | None:
    """The selected schedule's encoder and decoder searched together on the tuning images
    (`search.placement.pair`, from the symmetric pair, the noisiest step kept), then compared with the
    symmetric pair on the validation images (on the tuning ones without validation): the pair as the
    learned schedule (`Schedule.inverse_timesteps`) where it is lower, else None."""
    from search.placement.pair import pair_search
    from search.placement.polish import step_ladder

    T = model.num_train_timesteps
    _, learned = holdout.learned_schedule(selection.trial, cfg.space, T, cfg.solver)

    def as_schedule(d: Sequence[int], e: Sequence[int]) -> Schedule:
        return Schedule(d, T, "learned", learned.params, learned.meta, inverse_timesteps=e)

    objective = Objective(cfg.objective)  # inversion: the value a trial would get

    def mean_inversion(ev: Any, schedules: list[Schedule]) -> list[float]:
        out = []
        for r in safe_evaluate(ev, schedules):
            try:
                if isinstance(r, Exception):
                    raise TrialFailed(str(r))
                out.append(objective.values(objective.metrics(r))[0])
            except (TrialFailed, StridelabError):  # a failed or non-finite round trip never wins
                out.append(math.inf)
        return out

    t0 = time.perf_counter()
    ev = evaluators(cfg.tuning_seeds)
    try:
        res = pair_search(lambda pairs: mean_inversion(ev, [as_schedule(d, e) for d, e in pairs]),
                          learned.timesteps, learned.timesteps[::-1], evals=cfg.pair_evals, ladder=step_ladder(T),
                          num_train_timesteps=T, pin_top=learned.timesteps[0] == T - 1, batch=cfg.parallel)
    finally:
        if factory is not None:
            factory.release(ev)
    pair = as_schedule(res.decoder, res.encoder)
    if tracker is not None:
        for used, v in res.history:
            tracker.log_metrics({"pair_tuning_inversion": v}, step=used)
    where, (sym, joint) = ("validation", mean_inversion(validation, [learned, pair])) if validation is not None \
        else ("tuning", (res.start_loss, res.loss))
    keep = pair.inverse_timesteps is not None and joint < sym
    log(f"joint encoder/decoder search: tuning inversion {res.start_loss:.4g} -> {res.loss:.4g} in {res.evals} round "
        f"trips, {time.perf_counter() - t0:.1f} s; {where} {joint:.4g} vs the symmetric pair's {sym:.4g}: "
        + ("the pair is exported" if keep else "the symmetric pair stays"))
    if tracker is not None:
        tracker.log_metrics({f"pair_{where}_inversion": joint, f"symmetric_{where}_inversion": sym, "pair_kept": float(keep)})
    if not keep:
        return None
    return replace(pair, params={**learned.params, "inversion_pair": "joint"},
                   meta={**learned.meta, "pair_search": {"evals": res.evals, "tuning_symmetric": res.start_loss,
                                                         "tuning_pair": res.loss, f"{where}_symmetric": sym,
                                                         f"{where}_pair": joint}})


def _held_out(cfg: SweepConfig, model: LoadedModel, study: optuna.Study, selection: select.Selection,
              factory: EvaluatorFactory | None, evaluators: Callable[[Sequence[int]], Any],
              log: Callable[[str], None], pair: Schedule | None = None) -> HeldOut:
    """Re-evaluate the selected schedule and every warm start (and, with FID, the teacher) on held-out seeds, all
    run by the sweep's solver, next to every other solver's own default spacing (reference rows) when the
    evaluators are the factory's (injected stand-ins serve the sweep's solver only). With a joint `pair` it is
    the learned row and the selected schedule's symmetric round trip is row `PAIR_SYMMETRIC`."""
    T = model.num_train_timesteps
    bt = selection.trial
    learned_name, learned = holdout.learned_schedule(bt, cfg.space, T, cfg.solver)
    named = {learned_name: learned, **holdout.warm_schedules(study, T)}
    tuning = holdout.tuning_recon(study, bt, learned_name)
    unshifted = holdout.unshifted_schedule(study, bt, T)
    if unshifted is not None:
        named[holdout.UNSHIFTED] = unshifted
        tuning[holdout.UNSHIFTED] = study.trials[int(bt.user_attrs["shift_from"])].user_attrs.get("recon")
    if pair is not None:
        tuning[holdout.PAIR_SYMMETRIC] = tuning.pop(learned_name)  # the pair's decoder was not what the trial ran
        named = {"learned": pair, holdout.PAIR_SYMMETRIC: learned, **holdout.warm_schedules(study, T)}
        learned_name, learned, tuning["learned"] = "learned", pair, None
    t0 = time.perf_counter()
    hold_eval = None
    if factory is not None and cfg.holdout_fid:
        try:
            hold_eval = factory(cfg.holdout_seed_list, fid=True)
        except StridelabError as e:
            log(f"no held-out FID: {e}")
    if hold_eval is not None:
        teacher_name, teacher = holdout.teacher_schedule(cfg, model.alphas_cumprod, T)
        named[teacher_name] = teacher
    hold_eval = hold_eval or evaluators(cfg.holdout_seed_list)
    entries = [(k, sched, cfg.solver) for k, sched in named.items() if not k.startswith(holdout.TEACHER_PREFIX)]
    if factory is not None:  # the other solvers' own defaults at this budget: what a user could pick instead
        entries += [(k, sched, solver) for k, (solver, sched) in holdout.reference_schedules(cfg, model).items()]
    entries += [(k, sched, "ddim") for k, sched in named.items() if k.startswith(holdout.TEACHER_PREFIX)]
    with progress(len(entries), f"held-out ({cfg.holdout_seeds} seeds)", unit="schedule") as bar:
        results = holdout.evaluate_by_solver(hold_eval, entries, cfg.solver, on_done=bar.update)
    log(f"held-out evaluation on {cfg.holdout_seeds} seeds: {time.perf_counter() - t0:.1f} s")
    named = {k: sched for k, sched, _ in entries}
    rows = holdout.holdout_rows(named, results, tuning, {k: solver for k, _, solver in entries})
    return HeldOut(bt, learned_name, learned, named, rows, selection.validation,
                   Objective(cfg.objective, cfg.fid_weight).per_seed_metric)


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials of the study by state name."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def default_study_name(cfg: SweepConfig) -> str:
    safe = "".join(c if c.isalnum() else "-" for c in cfg.model).strip("-")
    solver = "" if cfg.solver == "ddim" else f"-{''.join(c if c.isalnum() else '-' for c in cfg.solver)}"
    return f"{safe}{solver}-nfe{cfg.nfe}-{cfg.space}-{cfg.objective.replace(',', '_').replace('+', 'p')}-{time.strftime('%Y%m%d-%H%M%S')}"
