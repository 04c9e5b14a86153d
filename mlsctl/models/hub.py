"""Weights from the Hugging Face Hub, decided in under two seconds.

``model.pretrained: true`` and the DINOv2 fallback of ``embed`` need timm's weights. Left to
itself, huggingface_hub retries for most of a minute on a machine without network before it gives
up. :func:`hub_file` decides at once instead:

1. the file is in the Hugging Face cache → that file, and no network is touched;
2. ``HF_HUB_OFFLINE=1`` → a :class:`~mlsctl.errors.UserError` at once;
3. the hub does not answer one HTTPS request (``HEAD /api/models/REPO``, proxies honoured)
   within :data:`PROBE_SECONDS` → the same error. A TCP connection is not proof: a proxy or a
   sandbox may accept any connection and then fail every request, which is where the minute of
   retries came from;
4. otherwise the file is downloaded (said on stderr first).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Optional, Sequence

from mlsctl.errors import UserError, first_line

PROBE_SECONDS = 1.5


def offline_by_setting() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_answers(repo_id: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether the hub answers ``HEAD /api/models/<repo_id>`` within ``timeout`` seconds, name
    resolution and TLS included (the request runs in a thread, since a resolver may hang). Any HTTP
    answer below 500 counts: the hub is there, and the download says what is wrong."""
    import urllib.error
    import urllib.request

    answer: list[bool] = []

    def probe() -> None:
        request = urllib.request.Request(f"{_endpoint()}/api/models/{repo_id}", method="HEAD",
                                         headers={"User-Agent": "mlsctl"})
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                answer.append(True)
        except urllib.error.HTTPError as exc:
            answer.append(exc.code < 500)
        except Exception:  # no route, no name, refused, TLS failure, timeout: not the hub
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def cached_file(repo_id: str, filenames: Sequence[str]) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return found
    return None


def hub_file(repo_id: str, filenames: Sequence[str], what: str, fix: str) -> str:
    """A local path to the first of ``filenames`` in ``repo_id`` (see the module docstring);
    ``what`` names the need and ``fix`` the alternative in the error sentence."""
    found = cached_file(repo_id, filenames)
    if found is not None:
        return found
    if offline_by_setting():
        raise UserError(f"{what}: {repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {fix}")
    if not hub_answers(repo_id):
        raise UserError(f"{what}: {repo_id} is not in the Hugging Face cache and {_endpoint()} does not answer "
                        f"(asked for {PROBE_SECONDS:g} s); {fix}")
    from huggingface_hub import hf_hub_download

    print(f"mlsctl: downloading {repo_id} from the Hugging Face Hub", file=sys.stderr, flush=True)
    last_error: Optional[Exception] = None
    for name in filenames:
        try:
            return hf_hub_download(repo_id, name, etag_timeout=10)
        except Exception as exc:  # a missing file name, the hub failing midway: try the next, then say so
            last_error = exc
    first = first_line(last_error) if last_error else "no file"
    raise UserError(f"{what}: downloading {repo_id} failed ({first}); {fix}")


def timm_pretrained_file(arch: str) -> str:
    """The local weights file of timm's pretrained ``arch`` (its Hugging Face repository)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    fix = "set model.weights to a local .safetensors/.pth file instead"
    if not repo:
        raise UserError(f"model.pretrained=true: timm has no Hugging Face weights for '{arch}'; {fix}")
    names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors", "pytorch_model.bin"]
    return hub_file(repo, names, f"model.pretrained=true for '{arch}'", fix)
