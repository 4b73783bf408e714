"""``stridelab train digits|digits-v|features``: train a bundled digits DDPM or the digits FID feature net.

``digits`` is the linear-beta eps model (``bundled:digits``); ``digits-v`` the same data and UNet with cosine
betas (``squaredcos_cap_v2``) and v prediction (``bundled:digits-v``).

Both write their output atomically (temporary file/dir beside the target, then rename), by default to a new
directory under ``results/train/`` (`TRAIN_OUT_ROOT`): the shipped assets under ``pipeline/assets/`` are
replaced only with ``--replace-bundled``.
"""

from __future__ import annotations

import argparse
import shlex

from jobs.common import add_deprecated_alias


TRAIN_OUT_ROOT = "results/train"
"""Where ``train TARGET`` writes without ``--out-dir``: ``results/train/TARGET`` (never the shipped assets)."""


def _command_line(argv_tail: list[str]) -> str:
    return "stridelab train " + " ".join(shlex.quote(a) for a in argv_tail)


def _destination(args: argparse.Namespace, target: str, bundled: object) -> tuple[str, list[str]]:
    """(output directory, the flags that chose it, for the recorded command line): ``--out-dir``, the bundled
    assets with ``--replace-bundled``, else ``results/train/TARGET``."""
    if args.replace_bundled:
        return str(bundled), ["--replace-bundled"]
    out = args.out_dir or f"{TRAIN_OUT_ROOT}/{target}"
    return out, ["--out-dir", out]


# train target -> (beta_schedule, prediction_type, default output directory attribute of pipeline.training.ddpm)
DDPM_TARGETS: dict[str, tuple[str, str, str]] = {
    "digits": ("linear", "epsilon", "DEFAULT_DDPM_DIR"),
    "digits-v": ("squaredcos_cap_v2", "v_prediction", "DEFAULT_DDPM_V_DIR"),
}


def run_digits(args: argparse.Namespace) -> int:
    """Train a DDPM on the digits and save it (EMA weights, safetensors) to ``args.out_dir``; which noise
    schedule and prediction type follow ``args.train_target`` (`DDPM_TARGETS`)."""
    import torch

    from pipeline.training import ddpm
    from pipeline.training.ddpm import TrainConfig, save_ddpm, train_ddpm, training_record

    target = getattr(args, "train_target", "digits")
    beta_schedule, prediction_type, default_dir = DDPM_TARGETS[target]
    cfg = TrainConfig(
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_minutes=args.max_minutes if args.max_minutes > 0 else None,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
    )
    torch.set_num_threads(args.threads)
    out, where = _destination(args, target, getattr(ddpm, default_dir))
    unet, history = train_ddpm(cfg)
    command = _command_line(
        [target, "--steps", str(args.steps), "--max-minutes", str(args.max_minutes), "--seed", str(args.seed),
         "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--threads", str(args.threads)] + where
    )
    path = save_ddpm(unet, out, training_record(cfg, history, command),
                     beta_schedule=beta_schedule, prediction_type=prediction_type)
    print(
        f"saved {path}: {history['steps']} steps in {history['wall_s']:.0f} s "
        f"(stopped by {history['stopped_by']}), smoothed loss {history['loss_ema']:.4f}, "
        f"{history['params']:,} params"
    )
    return 0


def run_features(args: argparse.Namespace) -> int:
    """Train the digits feature CNN on the train split, report test accuracy, save to ``args.out_dir``."""
    import torch

    from pipeline.errors import StridelabError
    from pipeline.metrics.features import DEFAULT_FEATURES_DIR, FeatureTrainConfig, save_feature_net, train_feature_net

    cfg = FeatureTrainConfig(seed=args.seed, epochs=args.epochs, lr=args.lr)
    out, where = _destination(args, "features", DEFAULT_FEATURES_DIR)
    torch.set_num_threads(args.threads)
    net, report = train_feature_net(cfg)
    if report["test_accuracy"] < args.min_accuracy:
        raise StridelabError(
            f"test accuracy {report['test_accuracy']:.4f} < --min-accuracy {args.min_accuracy}; not saved"
        )
    command = _command_line(["features", "--epochs", str(args.epochs), "--seed", str(args.seed), "--lr", str(args.lr)]
                            + where)
    path = save_feature_net(net, out, {**report, "command": command})
    print(f"saved {path}: test accuracy {report['test_accuracy']:.4f} ({report['test_size']} images)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` with its ``digits``, ``digits-v`` and ``features`` sub-commands."""
    train = subparsers.add_parser(
        "train",
        help="train a bundled digits DDPM or the FID feature net",
        description="Train the small models bundled under pipeline/assets/ (digits/, digits-v/): into "
                    "results/train/TARGET by default, over the shipped assets only with --replace-bundled.",
    )
    sub = train.add_subparsers(dest="train_target", metavar="{digits,digits-v,features}", required=True)

    d = sub.add_parser(
        "digits",
        help="train the 8x8 digits DDPM (EMA weights, safetensors)",
        description="Train a UNet2DModel DDPM (linear betas, T=1000, eps) on sklearn's load_digits().",
    )
    _add_ddpm_arguments(d, "digits", "pipeline/assets/digits/ddpm")
    dv = sub.add_parser(
        "digits-v",
        help="train the 8x8 digits DDPM with cosine betas and v prediction (bundled:digits-v)",
        description="Train a UNet2DModel DDPM (cosine betas squaredcos_cap_v2, T=1000, v prediction) on "
        "sklearn's load_digits(); the same UNet and data as `train digits`.",
    )
    _add_ddpm_arguments(dv, "digits-v", "pipeline/assets/digits-v/ddpm")

    f = sub.add_parser(
        "features",
        help="train the 8x8 digits feature CNN used for FID/KID",
        description="Train a small CNN classifier on the digits train split; its penultimate layer gives FID features.",
    )
    f.add_argument("--epochs", type=int, default=60, help="(default: %(default)s)")
    f.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    f.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default: %(default)s)")
    f.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    f.add_argument("--min-accuracy", type=float, default=0.97,
                   help="refuse to save below this test accuracy (default: %(default)s)")
    _add_out_arguments(f, "features", "pipeline/assets/digits/features", "--fid-features digits:DIR")
    f.set_defaults(func=run_features)


def _add_ddpm_arguments(d: argparse.ArgumentParser, target: str, bundled: str) -> None:
    """The flags shared by ``train digits`` and ``train digits-v``."""
    d.add_argument("--steps", type=int, default=3600, help="optimiser steps (default: %(default)s)")
    d.add_argument("--max-minutes", type=float, default=22.0,
                   help="wall-clock budget; the LR schedule anneals to it; 0 = none (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    d.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    d.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: %(default)s)")
    d.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    _add_out_arguments(d, target, bundled)
    d.set_defaults(func=run_digits)


def _add_out_arguments(p: argparse.ArgumentParser, target: str, bundled: str, use: str = "--model DIR") -> None:
    """``--out-dir`` (default ``results/train/TARGET``) or ``--replace-bundled`` (the shipped assets), not both."""
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out-dir", default=None,
                     help=f"output directory (default: {TRAIN_OUT_ROOT}/{target}; use it with {use})")
    add_deprecated_alias(out, "--out", "--out-dir", "out_dir")
    out.add_argument("--replace-bundled", action="store_true",
                     help=f"write over the shipped {bundled} instead (what every run that loads the bundled assets uses)")
