"""`stridelab export`: write a sweep's learned schedule as JSON (and every trial as Parquet)."""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import add_deprecated_alias

FORMATS = ("stridelab", "comfyui", "k-diffusion")  # search.export.FORMATS (a test keeps them equal; no import at parse time)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a sweep's best schedule as JSON",
        description=(
            "Export the best schedule of a sweep, from its MLflow parent run (--run) or its Optuna study "
            "(--study-name, --storage). The JSON has timesteps (descending), sigmas (n+1, ending in 0), "
            "num_train_timesteps, nfe, the model id and a sha256 of its alphas_cumprod, metrics, "
            "provenance and the solver it was tuned with (diffusers class + config, k-diffusion and ComfyUI "
            "sampler names); `Schedule.load` reads it back. --format comfyui / k-diffusion write what those "
            "tools take instead."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", default=None, help="the sweep's MLflow parent run id")
    src.add_argument("--study-name", default=None, help="Optuna study name (with --storage)")
    add_deprecated_alias(src, "--study", "--study-name", "study_name")
    p.add_argument("--storage", default="results/sweep/optuna.journal",
                   help="Optuna storage of --study-name: journal file or RDB URL (default %(default)s)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of --run (default sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--out", default="schedule.json", help="output file: the schedule JSON (default %(default)s)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="stridelab",
                   help="stridelab: the export itself (default); comfyui: the sigma string for a ManualSigmas node "
                        "feeding SamplerCustom's sigmas, and the KSamplerSelect sampler_name; k-diffusion: the "
                        "sampling.sample_* name and its sigmas")
    p.add_argument("--trial", type=int, default=None,
                   help="with --study-name: export this trial number instead of the best (e.g. another point of a "
                        "recon,fid Pareto front; the sweep's trials.parquet lists them)")
    p.add_argument("--table", default=None, help="output file: also write every trial of --study-name as a Parquet table here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.errors import StridelabError
    from search import export

    if args.run:
        if args.table or args.trial is not None:
            raise StridelabError(f"{'--table' if args.table else '--trial'} needs --study-name (the trials live in the Optuna study)")
        from search.tracking import default_tracking_uri

        path = export.export_from_run(args.run, args.out, args.tracking_uri or default_tracking_uri(), fmt=args.fmt)
    else:
        import optuna

        from search.study import make_storage, missing_store, no_study_message, study_names

        if missing_store(args.storage) is not None:  # opening it would create an empty store
            raise StridelabError(f"no study named {args.study_name!r}: {args.storage} does not exist")
        storage = make_storage(args.storage)
        if args.study_name not in (names := study_names(storage)):
            raise StridelabError(f"{args.storage}: {no_study_message(args.study_name, names)}")
        study = optuna.load_study(study_name=args.study_name, storage=storage)
        path = export.export_from_study(study, args.out, args.storage, trial=args.trial, fmt=args.fmt)
        if args.table:
            print(f"wrote {export.write_trials_parquet(study, args.table)}")
    assumed = json.loads(path.read_text(encoding="utf-8"))["solver"].get("assumed")
    if assumed:
        print(f"stridelab export: note: solver {assumed}", file=sys.stderr)
    print(f"wrote {path}")
    return 0
