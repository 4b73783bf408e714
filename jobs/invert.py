"""`stridelab invert`: a user's images to their DDIM noise and back, with the round-trip error per image."""

from __future__ import annotations

import argparse

from jobs.common import add_model_arg, check_out_dir

GRID_IMAGES = 16
"""The before/after grid shows the first this many images (originals above, reconstructions below)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "invert",
        help="encode images to their DDIM noise (inversion) and decode them back",
        description=(
            "Encode images with DDIM inversion along a schedule's encoder list (its inverse_timesteps, else its "
            "timesteps reversed) and decode the codes with the same or another schedule (--decode-schedule). "
            "IMAGES: a folder of PNGs (8-bit grey or RGB, the model's size), a .npy array [N, C, H, W] or a "
            ".parquet file (a 'sample' column as `stridelab sample` writes, or PNG bytes in 'image'), in the "
            "model's data range, or digits:SPLIT[:N] (the first N bundled digits of split train, test or all). Writes DIR/noise.safetensors (or noise.parquet: the codes and reconstructions), "
            "DIR/errors.csv (or .parquet: per-image MSE on [0, 1], the DDIM paper's reconstruction error), "
            "DIR/grid.png (originals above, reconstructions below) and DIR/schedule.json (the decoder, with the "
            "encoder list when it differs); DIR appears only when complete. A schedule learned with "
            "`stridelab sweep --objective inversion --time-shift` carries per-step model time shifts for its encoder "
            "and decoder: both are run (the network is told the shifted levels). Runs in this process."
        ),
    )
    add_model_arg(p)
    p.add_argument("--images", required=True, help="a PNG folder, a .npy or a .parquet file, or digits:SPLIT[:N] (see above)")
    p.add_argument("--schedule", required=True, help="the encoder (and decoder): a schedule name (needs --nfe) or a .json file")
    p.add_argument("--nfe", type=int, default=None, help="steps of a named --schedule (and of --decode-schedule)")
    p.add_argument("--decode-schedule", default=None,
                   help="decode with this schedule instead (name or .json); it must start where the encoder ends")
    p.add_argument("--decode-nfe", type=int, default=None, help="steps of a named --decode-schedule (default --nfe)")
    p.add_argument("--format", dest="noise_format", choices=("safetensors", "parquet"), default="safetensors",
                   help="noise file and error table: safetensors + CSV, or Parquet for both (default %(default)s)")
    p.add_argument("--out-dir", required=True, help="output directory DIR (replaced atomically if it exists)")
    p.set_defaults(func=run)


def _schedules(args: argparse.Namespace, model):
    """(encoder list, decoder Schedule) from the flags, checked to meet at one noise level. The decoder carries
    the encoder's list and its model time shift (`Schedule.inverse_model_shift`), so schedule.json says both."""
    from pipeline.core.schedules import INVERSE_MODEL_SHIFT_KEY, Schedule, resolve_schedule
    from pipeline.errors import StridelabError

    T = model.num_train_timesteps
    enc = resolve_schedule(args.schedule, args.nfe, model.alphas_cumprod)
    if args.decode_schedule is None:
        return enc.encode_timesteps, enc
    dec = resolve_schedule(args.decode_schedule, args.decode_nfe or args.nfe, model.alphas_cumprod)
    if dec.timesteps[0] != enc.encode_timesteps[-1]:
        raise StridelabError(f"--decode-schedule starts at timestep {dec.timesteps[0]} but the --schedule encoder ends at "
                             f"{enc.encode_timesteps[-1]}: the codes must be decoded from the level they are at")
    meta = {k: v for k, v in dec.meta.items() if k != INVERSE_MODEL_SHIFT_KEY}
    if enc.inverse_model_shift is not None:
        meta[INVERSE_MODEL_SHIFT_KEY] = list(enc.inverse_model_shift)
    decoder = Schedule(dec.timesteps, T, dec.name, dec.params, meta, inverse_timesteps=enc.encode_timesteps)
    return enc.encode_timesteps, decoder


def _grid(x01, rec01):
    from pipeline.io.images import png_bytes, tile

    import torch

    k = min(GRID_IMAGES, x01.shape[0])
    return png_bytes(tile(torch.cat([x01[:k], rec01[:k]]), cols=k, scale=4))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.io.files import atomic_directory, atomic_write_bytes
    from pipeline.models.sources import read_source
    from pipeline.io.noise_files import write_noise
    from pipeline.io.reports import write_table
    from pipeline.evaluation.inprocess import shifted_round_trip
    from pipeline.models.load import load_model

    out = Path(args.out_dir)
    check_out_dir(args.out_dir)
    model = load_model(args.model)
    encode, decoder = _schedules(args, model)
    x0, names = read_source(args.images, model.sample_shape, model.data_range)

    rt = shifted_round_trip(model.denoiser, x0, encode, decoder.timesteps, model.alphas_cumprod, model.to_unit,
                    decoder.inverse_model_shift, decoder.model_shift)
    mse = rt.errors.tolist()
    meta = {"model": args.model, "images": str(args.images), "timestep": encode[-1],
            "encode_timesteps": list(encode), "decode_timesteps": list(decoder.timesteps)}
    shifted = {k: list(v) for k, v in (("encode_shift", decoder.inverse_model_shift),
                                       ("decode_shift", decoder.model_shift)) if v is not None}
    meta.update(shifted)
    ext = {"safetensors": ("safetensors", "csv"), "parquet": ("parquet", "parquet")}[args.noise_format]
    with atomic_directory(out) as tmp:
        write_noise(tmp / f"noise.{ext[0]}", rt.x_T, rt.x_rec, names, mse, meta)
        write_table([{"name": n, "mse": e} for n, e in zip(names, mse)], tmp / f"errors.{ext[1]}")
        atomic_write_bytes(tmp / "grid.png", _grid(model.to_unit(x0), model.to_unit(rt.x_rec)))
        decoder.save(tmp / "schedule.json")
    names_of = {"encode_shift": "encoder", "decode_shift": "decoder"}
    how = f", model time shifts: {' and '.join(names_of[k] for k in shifted)}" if shifted else ""
    print(f"inverted {len(names)} images ({len(encode)} encoder steps, {decoder.nfe} decoder steps "
          f"{decoder.name}{how}): round-trip MSE on [0, 1] mean {rt.errors.mean().item():.3e}, "
          f"max {rt.errors.max().item():.3e} ({names[int(rt.errors.argmax())]}); wrote {out}")
    return 0
