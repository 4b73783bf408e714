"""Defaults of `stridelab sweep`, importable without torch/optuna (the CLI builds its parser from them)."""

DEFAULT_MODEL = "bundled:digits"
"""The default sweep's model: the bundled digits DDPM (ships in pipeline/assets, loads offline)."""

DEFAULTS = {
    "nfe": 10,
    "trials": 150,
    "parallel": 4,
    "sampler": "tpe",
    "space": "warp",
    "objective": "recon",
    "fid_weight": 1.0,
    # 256 + 256 seeds and a 250-step teacher keep the default sweep on the bundled UNet within ~10 min on
    # 2 CPU cores; a 250-step teacher is ~1e-5 (per-dim MSE) from the 1000-step one, far below the
    # 1e-3..1e-2 errors of 10-step schedules it ranks. Analytic mixtures with rare mode switches want more
    # seeds: there a few seeds that land on another mode than the teacher's carry most of the mean error.
    "num_seeds": 256,
    "holdout_seeds": 256,
    # Seeds (a third disjoint range) that choose the exported schedule among the 5 best trials and every warm
    # start: a small sweep's best trial can be fitted to its tuning seeds (a few seeds that switch digit decide
    # the mean). 64 seeds cost the default sweep a 64-seed teacher and 15 evaluations on them: about 6% more
    # model evaluations (estimated from evaluation counts, not timed on the default sweep).
    "validation_seeds": 64,
    "teacher_nfe": 250,
    "seed": 0,
    "screen_seeds": 0,
    "actors": 2,
    # 11 warm starts + 59 TPE trials over the warp family + 80 polish trials: on the bundled model at NFE 10
    # this is 0.63x the best baseline's held-out recon in 7.3 min on 2 CPU cores (60 TPE-only trials: 0.76x).
    "polish": 80,
    # --time-shift's Adam iterations: on the default sweep (256 tuning seeds, all per step) the held-out recon went
    # 0.59x uniform at 100 -> 0.51x at 300 (12 min of the sweep's 18 on 2 CPUs); on 64 seeds it overfits (0.73x).
    # With 64-seed batches and the cosine, shorter budgets are unreliable: 100 iterations gave 0.46x, 0.67x and
    # 0.67x for three batch orders, 150 0.56x, 200 0.61x; 300 gave 0.506x and 0.507x (docs/BENCHMARKS.md).
    "shift_iters": 300,
    # --method gradient's tuning seeds per Adam step (0: all)
    "grad_batch": 0,
    # --time-shift's seeds per Adam step (0: all 256) and learning-rate decay. Measured in process on the default
    # sweep's best trial (300 iterations, lr 0.05, held out vs uniform): all 256 seeds at a constant rate 0.51x;
    # 64 per step at a constant rate 0.55x (the batches' noise; 600 iterations 0.51x); 64 per step annealed by
    # a cosine 0.506x and 0.507x (two batch orders) at about a third of the full batch's cost. The fresh-clone
    # default sweep with --time-shift then measured 0.46x in 11.9 min (the shift stage 5.8 of them), and with each
    # batch drawn from one pool (`batch_rows` groups) 0.50x in 10.0 min (the stage 3.8 of them; another batch order).
    "shift_batch": 64,
    "shift_lr_decay": "cosine",
    # --time-shift with --objective inversion: the encoder's and the decoder's shifts (on fixed steps at NFE 10,
    # 0.47x / 0.24x the best baseline's held-out round trip on digits / digits-v; the encoder's alone 0.78x / 0.79x)
    "shift_sides": "both",
}
"""Flag defaults shared by `search.sweep.SweepConfig` and `jobs.sweep`."""
