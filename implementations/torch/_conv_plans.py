"""Which strategy torch-fused uses for each product of its two convolutions, chosen where it runs.

The fastest way to do a convolution's forward, weight gradient and input gradient depends on the machine
(oneDNN's convolution beats im2col + GEMM on one CPU and loses on another), so torch-fused measures the
candidates on the first step of a batch shape, as cuDNN's benchmark mode does, keeps the fastest, and caches
the choice in a small JSON file keyed by everything the choice depends on (machine, torch version, device,
dtype, shape, threads), so a second process reads it instead of measuring again.

This module is the choice rule and the cache, free of torch: timings in, names of strategies out.  The
strategies themselves and their measurement are in :mod:`implementations.torch.fused`.

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
CACHE_FORMAT = 2  # 2: the spectral strategy joined the candidates; choices measured without it are measured again
# A strategy that reuses what its forward kept (im2col + GEMM: the patch matrix; spectral: the spectra) is
# timed twice in the backward's phases: reusing it (under its own name), and after any other forward, building
# its own (under the name here).
OWN_PATCHES = "im2col-gemm (own patches)"
KEPT_PATCHES = "im2col-gemm"
OWN_SPECTRA = "spectral (own spectra)"
OWN = {KEPT_PATCHES: OWN_PATCHES, "spectral": OWN_SPECTRA}


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

    Phases: "forward", "weight gradient" and, where timed, "input gradient"; a strategy of :data:`OWN` has,
    in the backward's phases, a second timing under its :data:`OWN` name for when the forward was another.
    The three are chosen together (the least sum), since what a backward product costs depends on what the
    forward kept.  Returns {"forward": ..., "weight": ..., "input": ...} ("input" is None where none was timed).
    """
    forwards = {name: s for (phase, name), s in seconds.items() if phase == "forward"}
    weights = {name: s for (phase, name), s in seconds.items() if phase == "weight gradient"}
    inputs = {name: s for (phase, name), s in seconds.items() if phase == "input gradient"}
    if not forwards or not weights:
        raise ValueError("a plan needs timings of the forward and of the weight gradient")
    own_names = {own: kept for kept, own in OWN.items()}

    def cost(table: dict, forward: str, name: str) -> float:
        own = OWN.get(name)
        if own is None:
            return table[name]
        if forward == name:  # reuses what the forward kept; building it anew is an upper bound
            return table.get(name, table.get(own, float("inf")))
        return table.get(own, float("inf"))

    def strategies(table: dict) -> set:
        return {own_names.get(name, name) for name in table}  # a pruned run may lack one of the two timings

    candidates = []
    for forward, forward_seconds in forwards.items():
        weight = min(strategies(weights), key=lambda name: (cost(weights, forward, name), name))
        input_ = min(strategies(inputs), key=lambda name: (cost(inputs, forward, name), name)) if inputs else None
        total = forward_seconds + cost(weights, forward, weight) + (cost(inputs, forward, input_) if inputs else 0.0)
        candidates.append((total, forward, weight, input_))
    _, forward, weight, input_ = min(candidates)
    return {"forward": forward, "weight": weight, "input": input_}
