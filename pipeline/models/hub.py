"""The Hugging Face Hub: download a diffusers pipeline (safetensors only), and say clearly when offline."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pipeline.errors import StridelabError, first_line


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a later setenv counts too.
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _is_network_error(e: BaseException) -> bool:
    """True when `e` (or anything it was raised from) says the Hub could not be reached."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    network_types: tuple[type, ...] = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
    for mod, names in (("httpx", ("ConnectError", "TimeoutException")), ("requests", ("ConnectionError", "Timeout"))):
        if importlib.util.find_spec(mod) is not None:
            m = __import__(mod)
            network_types += tuple(getattr(m, n) for n in names if hasattr(m, n))
    markers = ("not fully cached", "outgoing traffic has been disabled", "offline", "connect")
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, network_types) or any(m in str(e).lower() for m in markers):
            return True
        e = e.__cause__ or e.__context__
    return False


def _download(repo_id: str) -> Path:
    """Fetch a Hub pipeline with diffusers (safetensors only; the local cache when offline); its local path."""
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(repo_id, use_safetensors=True, local_files_only=_hub_offline()))
    except (OSError, ValueError, RuntimeError) as e:
        if _is_network_error(e):
            raise StridelabError(
                f"cannot download {repo_id!r}: no network access (offline). Pre-download it on a machine with "
                f"network: `huggingface-cli download {repo_id} --local-dir DIR`, then pass DIR as the `model` spec"
            ) from None
        raise StridelabError(f"cannot download {repo_id!r} from the Hugging Face Hub: {first_line(e)}") from None
