"""Held-out DDIM round trip of a sweep study's best trial vs its warm starts (bundled:digits test split), with paired
intervals: `python benchmarks/inversion_holdout_from_journal.py JOURNAL STUDY N_IMAGES` (used for an interrupted sweep)."""
import sys, time, torch, optuna
from search.study import make_storage
from pipeline.metrics.recon import inversion_errors, paired_ratio_interval
from pipeline.models.load import load_model
from search.sweep.config import HOLDOUT_OFFSET
torch.set_num_threads(2)
journal, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
st = optuna.load_study(study_name=name, storage=make_storage(journal))
done = [t for t in st.get_trials() if t.state.name == "COMPLETE"]
base = {t.user_attrs["schedule"]: t for t in done if t.user_attrs.get("kind") == "baseline"}
search = [t for t in done if t.user_attrs.get("kind") != "baseline"]
best = min(search, key=lambda t: t.value)
top = [t for t in search if t.user_attrs["timesteps"][0] >= 900]
best900 = min(top, key=lambda t: t.value) if top else None
m = load_model("bundled:digits")
x = m.denoiser.sample_data(list(range(HOLDOUT_OFFSET, HOLDOUT_OFFSET + n)))
t0 = time.time()
err = {k: inversion_errors(m.denoiser, x, t.user_attrs["timesteps"], m.alphas_cumprod, m.to_unit) for k, t in base.items()}
rows = [("learned (best tuning trial %d)" % best.number, best)] + ([("learned, first step >= 900 (trial %d)" % best900.number, best900)] if best900 else [])
bb = min(err, key=lambda k: err[k].mean().item())
bb900 = min((k for k in err if base[k].user_attrs["timesteps"][0] >= 900), key=lambda k: err[k].mean().item())
for k in sorted(err, key=lambda k: err[k].mean().item()):
    print(f"{k:16s} {err[k].mean().item():.3e} (sem {err[k].std().item()/n**.5:.1e}) tuning {base[k].value:.3e}  {base[k].user_attrs['timesteps']}")
for label, t in rows:
    e = inversion_errors(m.denoiser, x, t.user_attrs["timesteps"], m.alphas_cumprod, m.to_unit)
    for ref in (bb, bb900):
        lo, hi = paired_ratio_interval(e, err[ref])
        print(f"{label}: {e.mean().item():.3e} tuning {t.value:.3e} x {ref} {e.mean().item()/err[ref].mean().item():.3f} ({lo:.3f}-{hi:.3f})  {t.user_attrs['timesteps']}")
print(f"{time.time()-t0:.0f} s")
