"""Figures of a sweep (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.schedules import Schedule


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_ticks(ax: Any, xfmt: str = "{:.0e}", yfmt: str = "{:g}") -> None:
    """Ticks at 1, 2, 3, 5 x 10^k on both (log) axes (1, 3 x 10^k past 1.5 decades, 10^k past 3, where the denser
    labels would run into each other): an axis spanning under a decade otherwise shows one label, and
    matplotlib's minor labels overlap. Call it once the data are drawn (it reads the axis limits)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis, fmt, lim in ((ax.xaxis, xfmt, ax.get_xlim()), (ax.yaxis, yfmt, ax.get_ylim())):
        lo, hi = sorted(lim)
        decades = math.log10(hi / lo) if lo > 0 else 0.0
        subs = (1.0, 2.0, 3.0, 5.0) if decades < 1.5 else (1.0, 3.0) if decades < 3 else (1.0,)
        axis.set_major_locator(LogLocator(subs=subs))
        axis.set_major_formatter(FuncFormatter(lambda v, _, f=fmt: f.format(v)))
        axis.set_minor_formatter(NullFormatter())


def steps_plot(schedules: Mapping[str, Schedule], alphas_cumprod: torch.Tensor, path: str | os.PathLike,
               highlight: str = "learned") -> Path:
    """Timestep and log sigma per step index for every schedule; `highlight` drawn bold."""
    from pipeline.core.noise import sigmas_of

    plt = _plt()
    log_sig = sigmas_of(alphas_cumprod).log().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, s in schedules.items():
        ts = np.array(s.timesteps)
        bold = name == highlight or name.startswith(highlight)
        kw = dict(lw=2.8, color="black", zorder=5) if bold else dict(lw=1.0, alpha=0.75)
        kw2 = dict(kw, marker="o", ms=4 if bold else 2)
        axes[0].plot(range(len(ts)), ts, label=name, **kw2)
        axes[1].plot(range(len(ts)), log_sig[ts], label=name, **kw2)
    axes[0].set(xlabel="step i", ylabel="timestep t_i", title="timesteps")
    axes[1].set(xlabel="step i", ylabel="log sigma(t_i)", title="log sigma per step")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def gradient_path_plot(path: Sequence[Sequence[float]], losses: Sequence[float], out: str | os.PathLike,
                       all_seeds: Sequence[int] | None = None) -> Path:
    """The gradient placement's course: each step's continuous timestep per iteration (left; path [iters + 1][n])
    and the mean loss per iteration (right, log scale). With mini-batches, `all_seeds` are the iterations whose loss
    is over all the seeds: those are drawn as the line, the batches' noisier losses as grey dots."""
    plt = _plt()
    steps = np.asarray(path, dtype=float)
    its = np.arange(steps.shape[0])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i in range(steps.shape[1]):
        axes[0].plot(its, steps[:, i], lw=1.2, label=f"step {i}")
    axes[0].set(xlabel="iteration", ylabel="timestep t_i (continuous)", title="step positions")
    axes[0].legend(fontsize=7, ncol=2)
    loss = np.asarray(losses, dtype=float)
    full = np.arange(len(loss)) if all_seeds is None else np.asarray(sorted(all_seeds), dtype=int)
    if len(full) < len(loss):
        batch = np.setdiff1d(np.arange(len(loss)), full)
        axes[1].plot(batch, loss[batch], ".", ms=3, color="0.65", label="mini-batch")
        axes[1].plot(full, loss[full], "o-", ms=3, lw=1.5, color="black", label="all tuning seeds")
        axes[1].legend(fontsize=8)
    else:
        axes[1].plot(its, loss, lw=1.5, color="black")
    axes[1].set_yscale("log")
    axes[1].set(xlabel="iteration", ylabel="mean loss vs teacher", title="gradient loss")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def history_plot(trials: Sequence[Any], path: str | os.PathLike, multi: bool = False) -> Path:
    """Objective per trial (complete / pruned / warm start) and best-so-far; for two objectives the Pareto plot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    done = [t for t in trials if t.state.name == "COMPLETE"]
    if multi:
        pts = np.array([t.values for t in done]) if done else np.zeros((0, 2))
        base = [t.user_attrs.get("kind") == "baseline" for t in done]
        front = np.ones(len(pts), dtype=bool)
        for i in range(len(pts)):
            front[i] = not any((pts[j] <= pts[i]).all() and (pts[j] < pts[i]).any() for j in range(len(pts)))
        # FIDs far above the front (a broken baseline) are pinned to the top edge, so the front keeps the room.
        top = float(pts[front, 1].max()) * 2.0 if len(pts) else None
        shown = pts.copy()
        if top is not None:
            shown[:, 1] = np.minimum(shown[:, 1], top)
        clipped = pts[:, 1] > top if top is not None else np.zeros(len(pts), dtype=bool)
        b = np.array(base, dtype=bool)
        ax.scatter(shown[~b & ~clipped, 0], shown[~b & ~clipped, 1], s=12, c="tab:blue", label="trials")
        if b.any():
            ax.scatter(shown[b & ~clipped, 0], shown[b & ~clipped, 1], s=30, marker="s", c="tab:orange",
                       label="warm starts")
        if clipped.any():
            ax.scatter(shown[clipped, 0], shown[clipped, 1], s=30, marker="^", c="tab:red",
                       label=f"FID > {top:.3g}, drawn at the edge")
        f = pts[front][np.argsort(pts[front][:, 0])]
        ax.plot(f[:, 0], f[:, 1], "k-o", ms=4, label="Pareto front")
        ax.set(xscale="log", yscale="log", xlabel="recon (tuning seeds)", ylabel="FID (tuning seeds)",
               title="Pareto front")
        if len(pts):
            _log_ticks(ax)
    else:
        xs = [t.number for t in done]
        ys = [t.values[0] for t in done]
        kinds = [t.user_attrs.get("kind", "search") for t in done]
        warm = [k == "baseline" for k in kinds]
        for kind, label in (("search", "search"), ("polish", "polish (one step moved)")):
            pick = [k == kind for k in kinds]
            if any(pick):
                ax.scatter([x for x, p in zip(xs, pick) if p], [y for y, p in zip(ys, pick) if p], s=12, label=label)
        ax.scatter([x for x, w in zip(xs, warm) if w], [y for y, w in zip(ys, warm) if w], s=30, marker="s",
                   label="warm starts (baselines, dp)")
        pruned = [t for t in trials if t.state.name == "PRUNED" and t.user_attrs.get("screen_recon") is not None]
        if pruned:
            ax.scatter([t.number for t in pruned], [t.user_attrs["screen_recon"] for t in pruned], s=12, marker="x",
                       c="gray", label="pruned (screen mean)")
        if ys:
            order = np.argsort(xs)
            best = np.minimum.accumulate(np.array(ys)[order])
            ax.step(np.array(xs)[order], best, where="post", c="k", label="best so far")
        if ys and min(ys) > 0:
            ax.set_yscale("log")
        ax.set(xlabel="trial", ylabel="objective", title="optimisation history")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def holdout_plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, highlight: str = "learned",
                 fid_span: float = 3.0) -> Path:
    """Held-out recon (x, log) against held-out FID (y, log), one labelled point per schedule of the final table.

    `rows` are the sweep's table rows (``schedule``, ``holdout_recon``, ``holdout_fid``); rows missing either or
    non-finite are left out. A teacher row (recon 0, off a log axis) is drawn as the FID floor, a dashed line:
    with a few hundred samples FID is mostly estimator bias, and no schedule can be expected below it. FIDs
    above `fid_span` x the lowest schedule's are pinned to the top edge (a triangle, value in the label), so
    one broken baseline does not squash the rest.
    """
    plt = _plt()
    pts, floor = [], None
    for r in rows:
        name, rec, fid = str(r["schedule"]), r.get("holdout_recon"), r.get("holdout_fid")
        if rec is None or fid is None or not (math.isfinite(rec) and math.isfinite(fid)):
            continue
        if name.startswith("teacher ("):
            floor = (name, fid)
        elif rec > 0 and fid > 0:
            pts.append((rec, fid, name))
    pts = merge_coincident(pts, highlight)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    top = min(f for _, f, _ in pts) * fid_span if pts else None
    labels, markers = [], []
    for rec, fid, names in pts:
        name = ", ".join(names)
        bold, clipped = highlight in names, top is not None and fid > top
        y = top if clipped else fid
        ax.scatter([rec], [y], s=110 if bold else 30, marker="^" if clipped else "*" if bold else "o",
                   c="black" if bold else "tab:red" if clipped else "tab:blue", zorder=5 if bold else 3)
        markers.append((rec, y))
        if clipped:  # pinned side by side on one line: slanted up into a band of their own, so they do not collide
            ax.annotate(f"{name} (FID {fid:.1f})", (rec, y), textcoords="offset points", xytext=(1, 5), rotation=30,
                        rotation_mode="anchor", ha="left", va="bottom", fontsize=7, color="tab:red")
            continue
        labels.append((rec, y, name, bold))
    if floor is not None:
        ax.axhline(floor[1], ls="--", c="gray", lw=1)
        ax.annotate(f"{floor[0]}: FID floor {floor[1]:.2f}", (0.01, floor[1]), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 4), fontsize=8, color="gray")
    ax.set(xscale="log", yscale="log", xlabel="held-out recon (MSE vs the teacher)", ylabel="held-out FID",
           title="every schedule of the final table on held-out seeds (lower left is better)")
    if top is not None:
        # room below the lowest point for its label, and above for the pinned band
        low = min([f for _, f, _ in pts] + ([floor[1]] if floor is not None else []))
        ax.set_ylim(low / 1.08, top * (2.2 if any(f > top for _, f, _ in pts) else 1.15))
    _log_ticks(ax)
    fig.tight_layout()
    place_labels(ax, labels, markers)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def merge_coincident(pts: Sequence[tuple[float, float, str]], first: str = "",
                     rtol: float = 1e-3) -> list[tuple[float, float, tuple[str, ...]]]:
    """Points ``(x, y, name)`` that coincide to `rtol` (relative, on both axes) as one ``(x, y, names)`` (`first`
    leading, then alphabetical): a solver's default spacing often equals a DDIM baseline (euler's and linspace's
    timesteps), and two labels on one marker cannot both be read. Sorted by x."""
    groups: list[list[tuple[float, float, str]]] = []
    for p in sorted(pts):
        near = next((g for g in groups
                     if abs(math.log(p[0] / g[0][0])) < rtol and abs(math.log(p[1] / g[0][1])) < rtol), None)
        if near is None:
            groups.append([p])
        else:
            near.append(p)
    return [(g[0][0], g[0][1], tuple(sorted((n for _, _, n in g), key=lambda n: (n != first, n)))) for g in groups]


# Where a point's label may go, tried in order: (dx, dy) in points from the point, then the text's alignment there.
_LABEL_OFFSETS = ((7, 0, "left", "center"), (-7, 0, "right", "center"), (5, 5, "left", "bottom"),
                  (5, -5, "left", "top"), (-5, 5, "right", "bottom"), (-5, -5, "right", "top"),
                  (0, 7, "center", "bottom"), (0, -7, "center", "top"), (5, 14, "left", "bottom"),
                  (5, -14, "left", "top"), (-5, 14, "right", "bottom"), (-5, -14, "right", "top"))


def place_labels(ax: Any, labels: Sequence[tuple[float, float, str, bool]],
                 markers: Sequence[tuple[float, float]]) -> list[Any]:
    """Annotate each ``(x, y, text, bold)`` (data coordinates) at the first of `_LABEL_OFFSETS` whose box overlaps
    no text already on the axes or placed before it, no other marker (`markers`, data coordinates) and stays
    inside the axes, and is no nearer another marker than its own; else where it costs least. Returns the
    annotations. Call it once the limits and the layout are final: it measures the boxes in display pixels."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = [t.get_window_extent(renderer) for t in ax.texts]
    anns = []
    marks = [ax.transData.transform(m) for m in markers]

    def overlap(a, b) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    def gap(box, px: float, py: float) -> float:
        return math.hypot(max(box.x0 - px, 0, px - box.x1), max(box.y0 - py, 0, py - box.y1))

    for x, y, text, bold in labels:
        own = ax.transData.transform((x, y))
        others = [(mx, my) for mx, my in marks if abs(mx - own[0]) + abs(my - own[1]) > 0.5]
        best = None
        for dx, dy, ha, va in _LABEL_OFFSETS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=8,
                              fontweight="bold" if bold else "normal")
            box = ann.get_window_extent(renderer)
            cost = sum(overlap(box, b) for b in placed)
            cost += sum(overlap(box, Bbox.from_bounds(mx - 4, my - 4, 8, 8)) for mx, my in others)
            # a label nearer another marker than its own reads as that marker's
            d_own = gap(box, *own)
            cost += sum(50 * max(0.0, d_own + 3 - gap(box, mx, my)) for mx, my in others)
            cost += 10 * (box.width * box.height - overlap(box, frame))  # the part outside the axes
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])
        anns.append(best[1])
    return anns


def round_trip_grid(model: Any, schedules: Mapping[str, Schedule], images: torch.Tensor,
                    path: str | os.PathLike) -> Path:
    """Images [N, C, H, W] (the model's data range) in the top row and below them, a row per schedule, their DDIM
    round trip (encode along `Schedule.encode_timesteps`, decode along the steps, with the schedule's model time
    shifts: `pipeline.evaluation.inprocess.shifted_round_trip`), each row titled with its mean per-image MSE on
    [0, 1]: where a round trip loses strokes, people see it before they read it."""
    from pipeline.evaluation.inprocess import shifted_round_trip
    from pipeline.io.images import tile

    plt = _plt()
    rows = [("images", model.to_unit(images), None)]
    for name, s in schedules.items():
        rt = shifted_round_trip(model.denoiser, images, s.encode_timesteps, s.timesteps, model.alphas_cumprod,
                                model.to_unit, s.inverse_model_shift, s.model_shift)
        rows.append((name, model.to_unit(rt.x_rec), float(rt.errors.double().mean())))
    n = images.shape[0]
    up = 4 if max(model.sample_shape[1:]) <= 16 else 1
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6.0, 0.55 * n), 1.15 * len(rows) + 0.4))
    for ax, (name, x, err) in zip(np.atleast_1d(axes), rows):
        ax.imshow(tile(x, n, up), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.axis("off")
        shifted = " (shifted)" if name in schedules and (schedules[name].model_shift or schedules[name].inverse_model_shift) else ""
        label = name if err is None else f"{name}{shifted}: {schedules[name].nfe} steps each way, round-trip MSE {err:.2e}"
        ax.set_title(label, fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def sample_grid(model: Any, schedules: Mapping[str, Schedule], seeds: Sequence[int], path: str | os.PathLike,
                reference: torch.Tensor | None = None, solver: str = "ddim") -> Path:
    """Samples of each schedule run by `solver` from the same x_T (same seeds), side by side; images as grids
    (via ``model.to_unit``, 8x8 digits upscaled x4), other data as a 2-D scatter."""
    from pipeline.core.seeds import initial_noise
    from pipeline.io.images import tile
    from pipeline.solvers.registry import solve

    from pipeline.evaluation.inprocess import sample_shifted

    plt = _plt()
    x_T, _ = initial_noise(list(seeds), model.sample_shape)

    def run(s: Schedule) -> torch.Tensor:  # with its model time shift where it has one, as the evaluators run it
        if s.model_shift is not None:
            return sample_shifted(model.denoiser, x_T, s.timesteps, s.model_shift, model.alphas_cumprod, solver)
        return solve(solver, model.denoiser, x_T, s.timesteps, model.alphas_cumprod)

    outs = {name: model.to_unit(run(s)) for name, s in schedules.items()}
    panels = list(outs.items()) + ([("reference", reference)] if reference is not None else [])
    is_image = len(model.sample_shape) == 3
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4))
    axes = np.atleast_1d(axes)
    for ax, (name, x) in zip(axes, panels):
        nfe = schedules[name].nfe if name in schedules else None
        title = (f"{name} ({nfe} steps)" if solver == "ddim" else f"{name}, {solver} ({nfe} steps)") if nfe else name
        if is_image:
            cols = int(math.ceil(math.sqrt(x.shape[0])))
            up = 4 if max(model.sample_shape[1:]) <= 16 else 1
            ax.imshow(tile(x, cols, up), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.axis("off")
        else:
            flat = x.reshape(x.shape[0], -1).cpu().numpy()
            ax.scatter(flat[:, 0], flat[:, 1] if flat.shape[1] > 1 else np.zeros(len(flat)), s=4)
            ax.set_aspect("equal")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
