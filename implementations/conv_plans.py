"""Which strategy torch-fused uses for each product of its two convolutions, chosen where it runs.

The fastest way to do a convolution's forward, weight gradient and input gradient depends on the machine
(oneDNN's convolution beats im2col + GEMM on one CPU and loses on another), so torch-fused measures the
candidates on the first step of a batch shape, as cuDNN's benchmark mode does, keeps the fastest, and caches
the choice in a small JSON file keyed by everything the choice depends on (machine, torch version, device,
dtype, shape, threads), so a second process reads it instead of measuring again.

This module is the choice rule and the cache, free of torch: timings in, names of strategies out.  The
strategies themselves and their measurement are in :mod:`implementations.torch_fused`.

Cache folder: ``$CAPSBENCH_PLAN_CACHE`` if set (tests point it at a temporary folder), else
``$XDG_CACHE_HOME/capsbench``, else ``~/.cache/capsbench``; the file is ``conv-plans.json``, written
atomically.  A file that cannot be read is ignored with a warning and rewritten after measuring.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from harness.results import write_json_atomic
from harness.settings import cache_dir

CACHE_FILE = "conv-plans.json"
CACHE_FORMAT = 1
# The weight gradient by im2col + GEMM reuses the forward's patch matrix when the forward made one; after
# any other forward it builds its own, a different cost, timed under this name.
OWN_PATCHES = "im2col-gemm (own patches)"
KEPT_PATCHES = "im2col-gemm"


def cache_path() -> Path:
    """The cache file, in :func:`harness.settings.cache_dir`."""
    return cache_dir() / CACHE_FILE


def cache_key(machine: str, torch_version: str, device: str, dtype: str, shape: dict, threads: int) -> str:
    """One string naming everything a choice depends on (the shape: each layer's convolution and the batch)."""
    return json.dumps({"machine": machine, "torch": torch_version, "device": device, "dtype": dtype,
                       "shape": shape, "threads": threads}, sort_keys=True)


def read_cache(path: Path | None = None) -> dict:
    """The cached choices by key; an absent file is empty, an unreadable one is empty with a warning."""
    path = path or cache_path()
    if not path.exists():
        return {}
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
            raise ValueError(f"not a format-{CACHE_FORMAT} plan cache")
        entries = payload["entries"]
        if not isinstance(entries, dict):
            raise ValueError("its entries are not an object")
        return entries
    except (OSError, ValueError, KeyError) as error:
        warnings.warn(f"ignoring the convolution plan cache {path} ({error}); the plan is measured again and "
                      f"the file rewritten", stacklevel=2)
        return {}


def write_cache_entry(key: str, entry: dict, path: Path | None = None) -> None:
    """Add (or replace) one choice in the cache file, atomically; a cache that cannot be written is a warning."""
    path = path or cache_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a corrupt file was reported when it was read
        entries = read_cache(path)
    entries[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"format": CACHE_FORMAT, "entries": entries})
    except OSError as error:
        warnings.warn(f"could not write the convolution plan cache {path} ({error}): the next process measures "
                      f"again", stacklevel=2)


def choose_layer(seconds: dict[tuple[str, str], float]) -> dict[str, str]:
    """The fastest strategies of one convolution from the seconds of each (phase, strategy).

    Phases: "forward", "weight gradient" (with :data:`OWN_PATCHES` for im2col + GEMM after a forward that
    kept no patch matrix) and, where timed, "input gradient".  Forward and weight gradient are chosen
    together (their sum), since the weight gradient's cost depends on whether the forward kept patches.
    Returns {"forward": ..., "weight": ..., "input": ...} ("input" is None where none was timed).
    """
    forwards = {name: s for (phase, name), s in seconds.items() if phase == "forward"}
    weights = {name: s for (phase, name), s in seconds.items() if phase == "weight gradient"}
    inputs = {name: s for (phase, name), s in seconds.items() if phase == "input gradient"}
    if not forwards or not weights:
        raise ValueError("a plan needs timings of the forward and of the weight gradient")

    def weight_cost(forward: str, weight: str) -> float:
        if weight != KEPT_PATCHES:
            return weights[weight]
        if forward == KEPT_PATCHES:  # reuses the forward's patches; building them is an upper bound
            return weights.get(KEPT_PATCHES, weights.get(OWN_PATCHES, float("inf")))
        return weights.get(OWN_PATCHES, float("inf"))

    names = {KEPT_PATCHES if name == OWN_PATCHES else name for name in weights}  # a pruned run may lack one
    pairs = [(forwards[f] + weight_cost(f, w), f, w) for f in forwards for w in names]
    _, forward, weight = min(pairs)
    return {"forward": forward, "weight": weight, "input": min(inputs, key=inputs.get) if inputs else None}
