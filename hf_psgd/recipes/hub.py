"""The Hub, checked once before a recipe needs it: without a network a run fails in seconds with what
to do, instead of after huggingface_hub's retries (about 30 s per file) or in a raw HTTP traceback."""

from __future__ import annotations

import threading
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.utils import get_session

from .arguments import BUILTIN_MODELS
from .errors import RecipeError, first_line
from .loading import Recipe
from .models import is_function_path

__all__ = ["PROBE_SECONDS", "check_hub", "hub_names"]

#: How long the Hub endpoint has to answer a HEAD request.
PROBE_SECONDS = 5.0
#: The keys that may name a Hub repository, in the order a run loads them.
_HUB_KEYS = (("data", "dataset_name"), ("model", "tokenizer_name_or_path"), ("model", "model_name_or_path"))


def hub_names(recipe: Recipe) -> dict[str, str]:
    """``{key: Hub id}`` for every recipe key that names a Hub repository (not a local path, a
    built-in model or a ``module:function``)."""
    names = {}
    for section, key in _HUB_KEYS:
        name = getattr(getattr(recipe, section), key)
        if name and name not in BUILTIN_MODELS and not is_function_path(name) and not Path(name).exists():
            names[key] = name
    return names


def _unreachable() -> str | None:
    """Why the Hub endpoint gave no answer within ``PROBE_SECONDS``; ``None`` if it answered. The
    request runs in a daemon thread: a hanging name lookup (which no HTTP timeout bounds) is left behind."""
    answers: list[str | None] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=PROBE_SECONDS)
            answers.append(None)
        except Exception as error:  # any failure to get an answer: DNS, refused, timeout, proxy, TLS
            answers.append(first_line(error))

    thread = threading.Thread(target=probe, name="hf-psgd-hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS)
    return answers[0] if answers else f"no answer in {PROBE_SECONDS:g} s"


def check_hub(recipe: Recipe) -> None:
    """Raise a :class:`RecipeError` that says what to do if the run needs the Hub and cannot reach it
    (one HEAD request; with ``HF_HUB_OFFLINE`` set, loads are left to the local cache)."""
    names = hub_names(recipe)
    push = recipe.training.push_to_hub
    if constants.HF_HUB_OFFLINE:
        if push:
            raise recipe.locate(
                RecipeError("push_to_hub", "HF_HUB_OFFLINE is set: unset it to push, or set --push_to_hub false")
            )
        return
    if not names and not push:
        return
    why = _unreachable()
    if why is None:
        return
    if names:
        key, name = next(iter(names.items()))
        what, remedy = f"load {name!r}", "set HF_HUB_OFFLINE=1 to load it from the local cache, or give a local path"
    else:
        key, what, remedy = "push_to_hub", "push the model", "set --push_to_hub false"
    message = f"cannot reach the Hub at {constants.ENDPOINT} to {what} ({why}); connect to the network, or {remedy}"
    raise recipe.locate(RecipeError(key, message))
