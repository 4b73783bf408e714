"""A finished sweep's outputs: files in its run directory, the MLflow parent run, the printed summary.

Files (in ``<out_dir>/<study>/``, each also an artifact of the parent run): ``best_schedule.json``
(`search.export`), ``comparison.csv`` (the held-out table), ``trials.parquet`` (every trial), and with
figures ``steps.png``, ``history.png``, ``holdout.png`` (when FID was evaluated) and ``samples.png``. A sweep with
a gradient placement also writes ``gradient_path.json`` (its continuous steps and loss per iteration) and, with
figures, ``gradient_path.png`` (`search.plots.gradient_path_plot`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import json

import optuna

from pipeline.core.schedules import Schedule, make_schedule
from pipeline.models.load import LoadedModel
from search.sweep.config import HOLDOUT_OFFSET, VALIDATION_OFFSET, SweepConfig
from search.sweep.holdout import UNSHIFTED, Verdict, is_baseline, verdict

TABLE_COLUMNS = ["schedule", "solver", "nfe", "holdout_recon", "x_best_baseline", "x_best_baseline 95%", "x_best_default_pair",
                 "x_best_default_pair 95%", "holdout_inversion", "inv_x_best_baseline", "inv_x_best_baseline 95%", "holdout_fid", "fid_x_best_baseline", "fid_gap_x_best_baseline", "tuning_recon",
                 "timesteps"]
"""The printed table; ``<ratio> 95%`` shows the CSV's ``<ratio>_lo`` and ``<ratio>_hi`` as one cell."""


@dataclass(frozen=True)
class HeldOut:
    """The held-out step's results: the best trial, the learned schedule, every row's schedule and the table."""

    best_trial: optuna.trial.FrozenTrial
    learned_name: str
    learned: Schedule
    named: Mapping[str, Schedule]
    rows: list[dict[str, Any]]
    validation: Mapping[int, float] | None = None
    metric: str = "recon"
    """The per-seed metric the verdict reads (`search.evaluators.Objective.per_seed_metric`)."""

    @property
    def verdict(self) -> Verdict:
        return verdict(self.rows, self.metric)

    def summary_metrics(self) -> dict[str, Any]:
        """The learned row's held-out numbers, ratios and their intervals, the exported trial's tuning numbers
        (and validation objective), and the verdict's kind."""
        ratios = ("x_best_baseline", "x_best_default_pair")
        metrics = {k: v for k, v in self.rows[0].items()
                   if k.startswith("holdout_") or k.endswith(ratios) or k.endswith(tuple(f"{r}_{e}" for r in ratios for e in ("lo", "hi")))}
        bt = self.best_trial
        metrics.update({f"tuning_{k}": bt.user_attrs[k] for k in ("recon", "fid", "inversion")
                        if bt.user_attrs.get(k) is not None})
        if self.validation and bt.number in self.validation:
            metrics["validation_objective"] = self.validation[bt.number]
        metrics["verdict"] = self.verdict.kind
        return metrics


@dataclass(frozen=True)
class Written:
    export_path: Path
    table_path: Path
    parquet_path: Path
    figures: tuple[Path, ...]
    extra: tuple[Path, ...] = ()
    """Other files (the gradient placement's path)."""


def write_files(cfg: SweepConfig, model: LoadedModel, study: optuna.Study, held: HeldOut, run_dir: Path,
                provenance: dict[str, Any], multi: bool, figures: bool) -> Written:
    """Write the JSON export, the CSV table, the Parquet trials table and (with `figures`) the plots."""
    from pipeline.io.reports import write_table
    from search import export

    export_path = export.write_export(run_dir / "best_schedule.json",
                                      export.export_for_model(held.learned, model, held.summary_metrics(), provenance))
    table_path = write_table(held.rows, run_dir / "comparison.csv")
    parquet_path = export.write_trials_parquet(study, run_dir / "trials.parquet")
    figs = _draw(cfg, model, study, held, run_dir, multi) if figures else []
    extra = []
    grad = gradient_path(study)
    if grad is not None:
        extra.append(run_dir / "gradient_path.json")
        extra[0].write_text(json.dumps({"solver": cfg.solver, "nfe": cfg.nfe, **grad}, indent=1) + "\n")
        if figures:
            from search import plots

            figs.append(plots.gradient_path_plot(grad["continuous_timesteps"], grad["loss"],
                                                 run_dir / "gradient_path.png", all_seeds=grad["all_seeds"]))
    return Written(export_path, table_path, parquet_path, tuple(figs), tuple(extra))


def gradient_path(study: optuna.Study) -> dict[str, Any] | None:
    """The gradient placement's course, from its trial (kind ``gradient``): ``iteration`` [iters + 1],
    ``continuous_timesteps`` [iters + 1][n] (entry 0 is the start), ``loss`` [iters + 1] (the mean per-seed
    loss before each Adam step, the final loss last; over a mini-batch except at ``all_seeds`` iterations) and the
    projected integer ``timesteps``; None without one."""
    for t in study.get_trials(deepcopy=False):
        path = t.user_attrs.get("gradient_path") if t.user_attrs.get("kind") == "gradient" else None
        if path:
            return {"trial": t.number, "iteration": list(range(len(path))), "continuous_timesteps": path,
                    "loss": t.user_attrs.get("gradient_losses"), "timesteps": t.user_attrs.get("timesteps"),
                    "all_seeds": t.user_attrs.get("gradient_full_iterations", list(range(len(path))))}
    return None


def sweep_provenance(cfg: SweepConfig, study_name: str, storage_spec: str, trial: int,
                     run_id: str | None, held: HeldOut | None = None) -> dict[str, Any]:
    """Where the exported schedule came from: study, trial, MLflow run, the seed ranges ([first, count]) and the
    held-out verdict (its one line)."""
    from search import export

    return export.provenance(study=study_name, storage=storage_spec, trial=trial, mlflow_run_id=run_id,
                             tuning_seeds=[cfg.seed, cfg.num_seeds],
                             validation_seeds=[cfg.seed + VALIDATION_OFFSET, cfg.validation_seeds] if cfg.validating else None,
                             holdout_seeds=[cfg.seed + HOLDOUT_OFFSET, cfg.holdout_seeds],
                             verdict=held.verdict.text if held is not None else None)


def _draw(cfg: SweepConfig, model: LoadedModel, study: optuna.Study, held: HeldOut, run_dir: Path,
          multi: bool) -> list[Path]:
    from search import plots

    # The sweep's own solver's rows only (not the teacher's 250 steps, not other solvers' references).
    same_nfe = {r["schedule"]: held.named[r["schedule"]] for r in held.rows
                if r.get("solver", cfg.solver) == cfg.solver and r.get("steps") == cfg.steps}
    figs = [plots.steps_plot(same_nfe, model.alphas_cumprod, run_dir / "steps.png", highlight="learned"),
            plots.history_plot(study.get_trials(deepcopy=False), run_dir / "history.png", multi)]
    if any("holdout_fid" in r for r in held.rows):
        figs.append(plots.holdout_plot(held.rows, run_dir / "holdout.png", highlight=held.learned_name))
    grid_seeds = cfg.holdout_seed_list[: cfg.grid_seeds]
    uniform_n = make_schedule("uniform", cfg.steps, model.alphas_cumprod)
    figs.append(plots.sample_grid(model, {"uniform": uniform_n, "learned": held.learned}, grid_seeds,
                                  run_dir / "samples.png", solver=cfg.solver))
    inv = [r for r in held.rows if "holdout_inversion" in r and r.get("solver", cfg.solver) == cfg.solver]
    base = [r for r in inv if is_baseline(r["schedule"])]
    if base and len(model.sample_shape) == 3:  # an inversion objective on images: the round trips side by side
        best = min(base, key=lambda r: r["holdout_inversion"])["schedule"]
        shown = {f"best baseline ({best})": held.named[best], held.learned_name: held.learned}
        if UNSHIFTED in held.named:
            shown[UNSHIFTED] = held.named[UNSHIFTED]
        images = model.denoiser.sample_data(grid_seeds[:16])
        figs.append(plots.round_trip_grid(model, shown, images, run_dir / "inversion.png"))
    return figs


def _metric_key(schedule: str, metric: str = "recon") -> str:
    """An MLflow metric name for a row: ``learned (= dp)`` -> ``holdout_recon/learned_eq_dp``,
    ``dpmsolver++2m default`` -> ``holdout_recon/dpmsolverpp2m_default`` (MLflow refuses '+', '(' and '=')."""
    name = schedule.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "eq").replace("+", "p")
    return f"holdout_{metric}/{name}"


def log_to_tracker(tracker: Any, written: Written, held: HeldOut) -> None:
    """Every file as an artifact, the numeric summary and each row's held-out recon as metrics."""
    for p in [written.export_path, written.table_path, written.parquet_path, *written.figures, *written.extra]:
        tracker.log_artifact(p)
    tracker.log_metrics({**{k: v for k, v in held.summary_metrics().items() if isinstance(v, (int, float))},
                         **{_metric_key(r["schedule"], m): r[f"holdout_{m}"] for r in held.rows
                            for m in ("recon", "inversion") if f"holdout_{m}" in r}})
    tracker.set_tag("best_trial", str(held.best_trial.number))
    tracker.set_tag("verdict", held.verdict.kind)
    tracker.set_tag("verdict_text", held.verdict.text)


def _interval_cells(row: Mapping[str, Any]) -> dict[str, str]:
    """``{"<ratio> 95%": "[lo, hi]"}`` for each ratio of `row` with an interval."""
    return {f"{c} 95%": f"[{row[c + '_lo']:.2f}, {row[c + '_hi']:.2f}]"
            for c in ("x_best_baseline", "x_best_default_pair", "inv_x_best_baseline") if f"{c}_lo" in row}


def print_summary(log: Callable[[str], None], cfg: SweepConfig, held: HeldOut, counts: dict[str, int],
                  written: Written, tracker: Any) -> None:
    """The held-out table, the trial counts and where the outputs went."""
    from pipeline.io.reports import format_table, short_steps
    from search.tracking import ui_command

    log("")
    log(format_table([{**r, **_interval_cells(r), "timesteps": short_steps(r["timesteps"], 10)} for r in held.rows],
                     TABLE_COLUMNS))
    if held.learned.inverse_timesteps is not None:
        log(f"the learned round trip encodes along {list(held.learned.inverse_timesteps)} "
            f"(its own encoder: inversion_pair joint)")
    if held.learned.inverse_model_shift is not None:
        log(f"the learned round trip's encoder asks the network at shifted levels (log sigma "
            f"{' '.join(f'{v:+.2f}' for v in held.learned.inverse_model_shift)}; time_shift, inversion): "
            "StrideDDIMInverseScheduler.from_schedule and stridelab invert run it")
    if held.learned.model_shift is not None:
        log(f"the learned schedule asks the network at shifted levels (log sigma "
            f"{' '.join(f'{v:+.2f}' for v in held.learned.model_shift)}; time_shift): StrideDDIMScheduler.from_schedule "
            "and stridelab's solvers run it, sigma lists and other schedulers drop it (the unshifted row shows that)")
    log(f"\nverdict: {held.verdict.text}")
    log(f"\ntrials: {counts}; held-out seeds {cfg.holdout_seed_list[0]}..{cfg.holdout_seed_list[-1]}")
    log(f"exported schedule: {written.export_path}")
    log(f"trials table: {written.parquet_path}")
    if tracker is not None:
        log(f"MLflow run {tracker.run_id}: {ui_command(tracker.tracking_uri)}")
