"""`stridelab sweep`: learn where a solver should place its steps (Optuna over an evaluator, MLflow tracking)."""

from __future__ import annotations

import argparse

from jobs.common import (OPTUNA_SAMPLERS, WARM_STARTS, add_deprecated_alias, add_dtype_arg, add_model_arg, add_ray_args,
                         add_seeds_args, add_solver_arg, add_teacher_nfe_arg, add_tracking_args, check_actors, name_list, show_names)


def register(sub: argparse._SubParsersAction) -> None:
    from types import SimpleNamespace

    from search.defaults import DEFAULTS

    d = SimpleNamespace(**DEFAULTS)
    p = sub.add_parser(
        "sweep",
        help="search step placements with Optuna; export the learned schedule",
        description=(
            "Search where a solver (--solver: DDIM, DPM-Solver++, UniPC, ...) should place its steps for the "
            "solver you will run. Every baseline schedule (the solver's own diffusers default spacing first) and "
            "a dynamic-programming placement are added to the study first; trials are asked in batches of --parallel "
            "and evaluated together (Ray actor pool, or in this process with --actors 0); hopeless trials "
            "are pruned on a seed subset. The last --polish trials move single steps of the best schedule so far "
            "(compass search on the integer timesteps). The best schedule and the baselines are re-evaluated on held-out "
            "seeds and printed as a table, next to every other solver's default spacing at the same NFE; the schedule is exported as JSON and everything is tracked in MLflow."
        ),
    )
    add_model_arg(p)
    add_solver_arg(p, "runs every trial, baseline, placement and held-out row")
    p.add_argument("--nfe", type=int, default=d.nfe,
                   help="model evaluations per sample (= steps, except heun: (nfe + 1) // 2 steps) (default %(default)s)")
    p.add_argument("--trials", type=int, default=d.trials,
                   help="trials in the study in total, warm starts included (default %(default)s)")
    p.add_argument("--parallel", type=int, default=d.parallel, help="trials asked and evaluated together (default %(default)s)")
    show_names(p.add_argument("--optuna-sampler", metavar="NAME", default=d.sampler,
                              help="Optuna sampler that proposes the trials: %(names)s (default %(default)s)"),
               OPTUNA_SAMPLERS)
    add_deprecated_alias(p, "--sampler", "--optuna-sampler", "optuna_sampler")
    p.add_argument("--method", choices=("optuna", "gradient"), default="optuna",
                   help="optuna: warm starts then Optuna trials; gradient: also learn continuous step times by "
                        "backpropagation through the solver against the teacher (LD3-style; ddim, dpmsolver++2m/3m), projected to "
                        "integer timesteps and added to the study as a warm start (default %(default)s)")
    p.add_argument("--grad-iters", type=int, default=100, help="--method gradient: Adam iterations (default %(default)s)")
    p.add_argument("--grad-batch", type=int, default=d.grad_batch,
                   help="--method gradient: tuning seeds per Adam step, a fresh random subset each step (every 25th "
                        "step and the last use all of them, and the best of those is kept); 0 = all "
                        "(default %(default)s)")
    p.add_argument("--grad-init", choices=("uniform", "dp"), default="uniform",
                   help="--method gradient: start from uniform steps or from the DP placement (needs dp among "
                        "--schedules, as by default) (default %(default)s)")
    p.add_argument("--grad-lr", type=float, default=0.05, help="--method gradient and --time-shift: Adam learning rate (default %(default)s)")
    p.add_argument("--grad-lr-decay", choices=("constant", "cosine"), default="constant",
                   help="--method gradient: keep the learning rate, or anneal it to 0 by a cosine over the iterations; "
                        "either way the iterate with the lowest tuning loss is kept (default %(default)s)")
    p.add_argument("--grad-loss", choices=("mse", "features", "lpips"), default="mse",
                   help="--method gradient and --time-shift: distance to the teacher: mse on the [0, 1] scale, features (the bundled "
                        "digits feature network's embeddings), lpips (needs the lpips package and its weights "
                        "installed) (default %(default)s)")
    p.add_argument("--slack-radius", type=float, default=0.0,
                   help="--method gradient and --time-shift: LD3 soft teacher forcing, the student may start within this radius "
                        "(per-dimension noise std units) of the teacher's noise; 0 = none (default %(default)s)")
    p.add_argument("--time-shift", action="store_true",
                   help="after the search, learn by gradient (--shift-iters, --grad-lr, --grad-loss) the best trial's "
                        "steps together with a per-step shift of the noise level the network is told it sees (TS-DDIM's "
                        "remedy for exposure bias, learned), as one more trial; exported where it wins on validation. "
                        "Only stridelab's solvers and StrideDDIMScheduler run the shift (it is meta.model_log_sigma_shift "
                        "in the export); sigma lists and other diffusers schedulers drop it. ddim, dpmsolver++2m/3m; "
                        "objective recon. With --objective inversion: the best trial's steps stay and the round trip's "
                        "encoder and decoder shifts are learned on the tuning images (--shift-iters, --shift-batch, "
                        "--grad-lr; MSE); StrideDDIMInverseScheduler and stridelab invert run the encoder's "
                        "(meta.inverse_model_log_sigma_shift)")
    p.add_argument("--shift-iters", type=int, default=d.shift_iters,
                   help="--time-shift: Adam iterations of the shift stage (default %(default)s; on the default sweep "
                        "300 gave 0.46x and 0.50x uniform held out for two batch orders, 100 gave 0.46x to 0.67x for three)")
    p.add_argument("--shift-batch", type=int, default=d.shift_batch,
                   help="--time-shift: tuning seeds per Adam step, as --grad-batch (default %(default)s)")
    p.add_argument("--shift-lr-decay", choices=("constant", "cosine"), default=d.shift_lr_decay,
                   help="--time-shift: as --grad-lr-decay; the cosine quiets the mini-batches' noise by the end "
                        "(default %(default)s)")
    p.add_argument("--shift-sides", choices=("both", "encoder"), default=d.shift_sides,
                   help="--time-shift with --objective inversion: learn the encoder's and the decoder's shifts (both), "
                        "or the encoder's only, so a plain decoder (any scheduler, a sigma list) decodes its codes "
                        "(measured at NFE 10 on fixed steps: both 0.47x the best baseline, encoder 0.78x; default %(default)s)")
    p.add_argument("--space", metavar="NAME", default=d.space,
                   help="warp (5 parameters), free (log sigma gaps), free_t (t gaps) or steps (integer timesteps) "
                        "(default %(default)s)")
    p.add_argument("--objective", metavar="NAME", default=d.objective,
                   help="recon (match the many-step teacher from the same noise), fid (sample quality; may leave "
                        "the teacher's trajectory: on the bundled model it learns a different schedule), recon+fid "
                        "(log recon + w log fid), recon,fid (Pareto front; export other points with "
                        "`stridelab export --trial`), inversion (DDIM round trip of real images: the digits "
                        "tuning/validation/test parts for the bundled models, exact draws for gmm:) or "
                        "recon,inversion (default %(default)s)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="--objective inversion / recon,inversion: round-trip your own images instead of the model's "
                        "data: a PNG folder, a .npy or a .parquet file as `stridelab invert` reads them (model size, "
                        "data range) or digits:SPLIT[:N]; split by a fixed permutation into tuning (60%%), validation "
                        "(20%%) and held-out (20%%) images, at least 10 in all; the parts set --num-seeds, "
                        "--validation-seeds and --holdout-seeds")
    p.add_argument("--inversion-pair", choices=("symmetric", "joint"), default="symmetric",
                   help="--objective inversion: symmetric (one schedule both ways) or joint: after the search, the "
                        "exported schedule's encoder and decoder searched together on the tuning images (same NFE "
                        "each way), kept only where it beats the symmetric round trip on the validation images; the "
                        "export then carries inverse_timesteps (default %(default)s)")
    p.add_argument("--pair-evals", type=int, default=60, metavar="N",
                   help="--inversion-pair joint: round trips the pair search may evaluate (default %(default)s)")
    p.add_argument("--fid-weight", type=float, default=d.fid_weight, help="w of recon+fid (default %(default)s)")
    add_seeds_args(p, d.num_seeds, "tuning seeds")
    add_deprecated_alias(p, "--seeds", "--num-seeds", "num_seeds", type=int)
    p.add_argument("--holdout-seeds", type=int, default=d.holdout_seeds,
                   help="held-out seeds for the final table, a disjoint range (default %(default)s)")
    p.add_argument("--validation-seeds", type=int, default=d.validation_seeds,
                   help="seeds (another disjoint range, never searched on) that choose the exported schedule "
                        "among the 5 best trials and every warm start; 0: export the best trial on the tuning "
                        "seeds (default %(default)s)")
    show_names(p.add_argument("--schedules", type=name_list, default=None, metavar="NAMES",
                   help="comma-separated warm-start schedules, from %(names)s (default: all but dp_free, the DP that "
                        "also chooses its first timestep; 'default', the solver's diffusers set_timesteps(n) spacing, "
                        "is DDIM's uniform)"), WARM_STARTS)
    add_deprecated_alias(p, "--baselines", "--schedules", "schedules", type=name_list)
    p.add_argument("--polish", type=int, default=d.polish,
                   help="trials (of --trials) that refine the best schedule at the end by moving one step at a "
                        "time on the integer grid (compass search; single objective only; at most two thirds of "
                        "the trials after the warm starts; default %(default)s)")
    p.add_argument("--no-prune", dest="prune", action="store_false", help="evaluate every trial on all tuning seeds")
    p.add_argument("--screen-seeds", type=int, default=d.screen_seeds,
                   help="seeds of the pruning screen (default: a quarter of the tuning seeds, at least 8)")
    p.add_argument("--no-holdout-fid", dest="holdout_fid", action="store_false",
                   help="skip FID in the held-out table (FID needs the pipeline.distributed evaluator)")
    add_teacher_nfe_arg(p, d.teacher_nfe)
    p.add_argument("--study-name", default=None, help="Optuna study name (default: model, nfe, space, objective, time)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: a journal file path or an RDB URL such as sqlite:///s.db or "
                        "postgresql://user@host/db (default <out-dir>/optuna.journal)")
    p.add_argument("--resume", action="store_true", help="continue --study-name up to --trials trials in total")
    add_tracking_args(p, "stridelab-sweep")
    p.add_argument("--out-dir", default="results/sweep",
                   help="output directory: outputs go to <out-dir>/<study-name>/ (default %(default)s)")
    add_dtype_arg(p)
    add_ray_args(p, d.actors)
    p.set_defaults(param_flags={"sampler": "--optuna-sampler", "baselines": "--schedules"})
    p.set_defaults(func=run, parser=p)


def resume_command(argv: list[str], study_name: str) -> str:
    """The command that continues this sweep: what was typed, with ``--study-name NAME --resume``."""
    import shlex

    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--study-name":
            skip = True
        elif not a.startswith("--study-name=") and a != "--resume":
            kept.append(a)
    return shlex.join(["stridelab", *kept, "--study-name", study_name, "--resume"])


def run(args: argparse.Namespace) -> int:
    from search.sweep import SweepConfig, default_study_name, run_sweep

    check_actors(args)
    cfg = SweepConfig(
        model=args.model, nfe=args.nfe, solver=args.solver, trials=args.trials, parallel=args.parallel, sampler=args.optuna_sampler,
        space=args.space, objective=args.objective, fid_weight=args.fid_weight, num_seeds=args.num_seeds,
        holdout_seeds=args.holdout_seeds, seed=args.seed, baselines=tuple(args.schedules) if args.schedules else None, prune=args.prune,
        screen_seeds=args.screen_seeds, teacher_nfe=args.teacher_nfe, holdout_fid=args.holdout_fid,
        polish=args.polish, validation_seeds=args.validation_seeds, dtype=args.dtype, method=args.method,
        grad_iters=args.grad_iters, grad_lr=args.grad_lr, grad_lr_decay=args.grad_lr_decay,
        grad_loss=args.grad_loss, slack_radius=args.slack_radius,
        data=args.data, time_shift=args.time_shift, shift_iters=args.shift_iters, shift_batch=args.shift_batch,
        shift_lr_decay=args.shift_lr_decay, shift_sides=args.shift_sides,
        grad_batch=args.grad_batch,
        grad_init=args.grad_init, inversion_pair=args.inversion_pair, pair_evals=args.pair_evals,
    )
    study_name = args.study_name or default_study_name(cfg)
    args.resume_hint = resume_command(getattr(args, "argv", ["sweep"]), study_name)  # printed if interrupted
    run_sweep(cfg, study_name=study_name, storage=args.storage, resume=args.resume, out_dir=args.out_dir,
              tracking_uri=args.tracking_uri, experiment=args.experiment, track=args.track, actors=args.actors,
              ray_address=args.ray_address, gpus_per_actor=args.gpus_per_actor, actor_resources=args.actor_resources,
              placement_timeout=args.placement_timeout, log=flag_printer(args))
    return 0


def flag_printer(args: argparse.Namespace):
    """``print`` for the sweep's log, naming this command's flags where a line names a parameter in backticks
    (the verdict's advice, the polish cap), as error lines do (`jobs.cli.error_line`)."""
    from jobs.cli import flag_names
    from pipeline.errors import StridelabError

    flags = {**flag_names(args.parser), **args.param_flags}
    return lambda line: print(StridelabError(line).render(flags.get))
