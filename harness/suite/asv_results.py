"""asv's results folder read into one tidy pandas table: one row per benchmark x parameter combination x run.

The layout asv writes (``results_dir`` in ``asv.conf.json``) and the suite's machine facts beside it::

    <results>/asv/benchmarks.json                          parameter names and units of every benchmark
    <results>/asv/<machine>/machine.json                   CPU, cores, RAM, OS (asv's own)
    <results>/asv/<machine>/<commit8>-<env>.json           one run: ``results`` keyed by benchmark name,
                                                           each a list in the order of ``result_columns``
    <results>/asv-facts/<machine>/<commit8>-<env>.json     GPU, library versions, BLAS, threads, profile

In a run file every benchmark's ``result`` list follows ``itertools.product(*params)``, the parameters are
stored as ``repr`` strings (decoded here with :func:`ast.literal_eval`), and the lists of a benchmark can be
shorter than ``result_columns`` (missing trailing statistics).  A skipped combination is NaN, a failed one
null; both become a row with value NaN (``status`` "skipped" / "failed"), never a dropped row.  A skipped cell
that the suite never measures under its routing algorithm, whatever the implementation (an algorithm that is
not iterative at any iteration count but one, :func:`harness.suite.sizes.measured_iterations`; a routing
gradient the algorithm does not have), has ``status`` "not applicable" (:func:`mark_not_applicable`): the
report leaves those rows out, as they are no skip of anything.  Beside the
value (asv's median of the samples, or the sample itself where there is one) each row keeps ``q25`` and
``q75`` (``stats_q_25`` / ``stats_q_75``), ``spread`` = q75 - q25 and ``samples`` (``stats_repeat``: how many
samples the figure rests on; 1 with ``asv run --quick``, NaN where asv records no statistics, as for
``track_`` benchmarks).

Benchmarks are matched by their function name (the last dotted part, e.g. ``time_train_step``), so the
suite's class names can change.  Parameters become columns: ``implementation`` (with ``framework``,
``device``, ``routing_variant`` and the GEMM ``backend`` as the run's facts file describes the
implementation, "unknown" where it does not), ``batch_size``,
``routing_iterations``, ``routing_gradient`` (``full`` where a benchmark has no such parameter; FLOPs are
counted for ``full`` only), ``routing_algorithm`` (``dynamic`` where a benchmark, or an older result, has no
such parameter: dynamic routing was the only algorithm then; FLOPs are counted for ``dynamic`` only); the
non-implementation benchmarks fill ``framework`` (CudaContext) or ``backend``
(GemmPeak) and leave ``implementation`` empty; any other parameter gets a column of its own name.

Timed phases also get their arithmetic: ``flops`` (:func:`harness.measure.flops.phase_flops` for the run's
network at that batch size and routing iterations), ``gflops_per_s``, ``peak_gflops`` (one figure per run for
every implementation: the hardware float32 peak from the run's facts, else the best GEMM measured in the
run; ``peak_source`` says which, ``best_gemm_gflops`` is the practical ceiling) and ``pct_of_peak``.
The network a run used follows from the ``profile`` in its facts file through :mod:`harness.suite.sizes`.

Nothing here raises on a bad file: every problem is one line in the returned ``warnings`` that names the
file, and the file (or the one benchmark entry) is skipped.
"""

from __future__ import annotations

import ast
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness import routing_algorithms
from harness.measure.flops import phase_flops
from harness.measure.peak import GPU_BACKENDS, backend_of, peak_sentence
from harness.results import ResultsFileError, read_json
from harness.settings import ASV_RESULTS_SUBDIR, FACTS_SUBDIR
from harness.spec import DEFAULT_ROUTING_ALGORITHM, get_config
from harness.suite.run_order import Ancestry, order_runs
from harness.suite.sizes import DEFAULT_PROFILE, PROFILES, measured_iterations

RESULTS_API_VERSION = 2  # asv.results.Results.api_version
UNKNOWN = "unknown"

# benchmark function name -> short metric name; a function not listed keeps its name minus the prefix
METRICS = {
    "time_train_step": "train_step",
    "time_forward": "forward",
    "time_backward": "backward",
    "time_inference": "inference",
    "time_routing": "routing",
    "time_routing_backward": "routing_backward",
    "peakmem_train_step": "host_memory_peak",
    "track_host_memory_train_step": "host_memory",
    "track_host_memory_before_model": "host_memory_before_model",
    "track_gpu_memory_nvml": "gpu_memory_nvml",
    "track_gpu_memory_nvml_increase": "gpu_memory_nvml_increase",
    "track_gpu_memory_allocator_live": "gpu_memory_allocator_live",
    "track_gpu_memory_allocator_reserved": "gpu_memory_allocator_reserved",
    # older runs: torch's live peak and CuPy's pool after the step in one figure (superseded by the two above)
    "track_gpu_memory_allocator_peak": "gpu_memory_allocator_mixed",
    "track_gpu_memory_nvml_process": "gpu_memory_nvml_process",
    "track_nvml_sampling_interval": "nvml_sampling_interval",
    "track_cuda_context_bytes": "cuda_context",
    "track_max_rel_error": "max_rel_error",
    "track_threads": "threads",
    "track_gemm_peak_gflops": "gemm_peak",
    "track_hardware_peak_gflops": "hardware_peak",
}
PREFIX_UNITS = {"time_": "seconds", "peakmem_": "bytes", "mem_": "bytes", "track_": UNKNOWN}
GEMM_PEAK_METRIC = METRICS["track_gemm_peak_gflops"]
PHASES_WITH_FLOPS = frozenset(phase_flops(get_config("small"), 1))  # the phases harness.measure.flops counts

IMPLEMENTATION_COLUMNS = ["implementation", "framework", "device", "routing_variant", "backend"]
PARAMETER_COLUMNS = ["batch_size", "routing_iterations"]
VALUE_COLUMNS = ["benchmark", "metric", "value", "unit", "spread", "q25", "q75", "samples", "status"]
FLOPS_COLUMNS = ["flops", "gflops_per_s", "peak_gflops", "pct_of_peak", "peak_source", "best_gemm_gflops"]
# facts of the run a row belongs to (hardware_peak_gflops: the run's hardware float32 peak, a fact, not a parameter)
RUN_COLUMNS = ["machine", "commit", "env", "date", "profile", "config_name", "hardware_peak_gflops"]
TIDY_COLUMNS = IMPLEMENTATION_COLUMNS + PARAMETER_COLUMNS + VALUE_COLUMNS + FLOPS_COLUMNS + RUN_COLUMNS
RUN_KEY = ["machine", "commit", "env"]
ROUTING_GRADIENT_COLUMN = "routing_gradient"  # a parameter of the benchmarks whose work it changes
DEFAULT_ROUTING_GRADIENT = "full"
ROUTING_ALGORITHM_COLUMN = "routing_algorithm"  # a parameter of the phase, routing and memory benchmarks
NOT_APPLICABLE = "not applicable"  # a cell the suite never measures under its routing algorithm


@dataclass
class Run:
    """One asv results file: a (machine, commit, environment), with what the report says about it."""

    machine: str
    commit: str
    env: str
    date: pd.Timestamp  # the commit's date, as asv records it
    path: Path
    profile: str
    config_name: str
    profile_assumed: bool  # no facts file: the default profile was assumed
    facts: dict = field(default_factory=dict)
    measured: pd.Timestamp = pd.NaT  # when the last of its benchmarks ended (NaT where asv recorded no times)
    measured_from: pd.Timestamp = pd.NaT  # when the first of its benchmarks started

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.machine, self.commit, self.env)

    @property
    def short_env(self) -> str:
        return short_env_name(self.env)

    @property
    def label(self) -> str:
        """Machine, commit and (shortened) asv environment: what a heading needs to tell two runs apart."""
        return f"{self.machine} @ {self.commit[:8]}, {self.short_env}"


DEFAULT_ENV_TOOLS = ("virtualenv",)  # asv's default environment tool: left out of the short name
UNPINNED = ("setuptools", "wheel", "pip")  # build requirements asv names in every environment


def short_env_name(env: str) -> str:
    """asv's environment name without what every environment has: ``virtualenv-py3.11-setuptools-torch2.13.0``
    -> ``py3.11-torch2.13.0`` (a conda or existing environment keeps its tool's name)."""
    parts = [part for part in str(env).split("-") if part]
    if parts and parts[0] in DEFAULT_ENV_TOOLS and len(parts) > 1:
        parts = parts[1:]
    kept = [part for part in parts if part not in UNPINNED]
    return "-".join(kept or parts) or str(env)


@dataclass
class AsvResults:
    """Everything read from an asv results folder."""

    table: pd.DataFrame
    runs: list[Run]
    machines: dict[str, dict]  # machine name -> machine.json
    warnings: list[str]
    ancestry: Ancestry | None = None  # what ordered the runs (git asked in the results' repository)


def metric_name(function: str) -> str:
    """The short name of what a benchmark function measures (``time_train_step`` -> ``train_step``)."""
    if function in METRICS:
        return METRICS[function]
    for prefix in PREFIX_UNITS:
        if function.startswith(prefix):
            return function[len(prefix):]
    return function


def default_unit(function: str) -> str:
    """asv's unit of a benchmark type, for a benchmark that benchmarks.json does not describe."""
    for prefix, unit in PREFIX_UNITS.items():
        if function.startswith(prefix):
            return unit
    return UNKNOWN


def decode_param(text):
    """A parameter value as asv stores it (its ``repr``) back to the value; the text itself if not a literal."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError):
        return text


def as_number(value) -> float:
    """A result or statistic as a float: null (failed), NaN (skipped) and non-numbers become NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def implementation_facts(name: str, recorded: dict) -> dict:
    """Framework, device, routing variant and GEMM backend of an implementation as the run's facts file
    recorded them (results describe themselves, so a plugin measured elsewhere keeps its labels, and the
    report never imports an implementation); "unknown" for a name the file does not describe."""
    described = recorded.get(name) or {}
    framework, device = described.get("framework", UNKNOWN), described.get("device", UNKNOWN)
    return {"framework": framework, "device": device,
            "routing_variant": described.get("routing_variant", described.get("routing", UNKNOWN)),
            "backend": UNKNOWN if UNKNOWN in (framework, device) else backend_of(framework, device)}


def read_benchmarks(asv_dir: Path, warnings: list[str]) -> dict[str, dict]:
    """benchmarks.json: parameter names and unit of each benchmark (empty, with a warning, if unreadable)."""
    path = asv_dir / "benchmarks.json"
    if not path.exists():
        warnings.append(f"warning: {path}: missing; parameters are named param1, param2, ... "
                        "(run `asv run` again to write it)")
        return {}
    try:
        payload = read_json(path)
    except ResultsFileError as error:
        warnings.append(f"warning: {error}; parameters are named param1, param2, ...")
        return {}
    return {name: entry for name, entry in payload.items() if isinstance(entry, dict)}


def read_facts(results_root: Path, machine: str, commit: str, env: str, warnings: list[str]) -> dict | None:
    """The suite's machine facts beside a run (``asv-facts/<machine>/<commit8>-<env>.json``, or
    ``<commit8>.json`` from a run in an existing environment), or None."""
    folder = results_root / FACTS_SUBDIR / machine
    for path in (folder / f"{commit[:8]}-{env}.json", folder / f"{commit[:8]}.json"):
        if path.exists():
            try:
                return read_json(path)
            except ResultsFileError as error:
                warnings.append(f"warning: {error}; skipped")
                return None
    return None


def check_run_file(path: Path, payload: dict) -> None:
    """Raise ResultsFileError naming the file and the problem unless ``payload`` is an asv v2 results file."""
    if payload.get("version") != RESULTS_API_VERSION:
        raise ResultsFileError(f"{path}: asv results format version {payload.get('version')!r}, "
                               f"expected {RESULTS_API_VERSION} (asv >= 0.5)")
    for key in ("commit_hash", "env_name", "date", "params", "results", "result_columns"):
        if key not in payload:
            raise ResultsFileError(f"{path}: missing field {key!r}")
    columns = payload["result_columns"]
    if not isinstance(columns, list) or "result" not in columns or "params" not in columns:
        raise ResultsFileError(f"{path}: result_columns {columns!r} lacks 'result' or 'params'")
    if not isinstance(payload["results"], dict):
        raise ResultsFileError(f"{path}: 'results' is a {type(payload['results']).__name__}, not an object")
    if not isinstance(payload["params"], dict):
        raise ResultsFileError(f"{path}: 'params' is not an object")


def expand_benchmark(name: str, entry: list, columns: list[str], described: dict | None,
                     implementations: dict | None = None) -> list[dict]:
    """The rows of one benchmark in one run, in ``itertools.product(*params)`` order; ValueError if the
    entry does not fit its columns."""
    if not isinstance(entry, list):
        raise ValueError(f"entry is a {type(entry).__name__}, not a list")
    fields = dict(zip(columns, entry))  # lists may be shorter than the columns: missing trailing stats
    params = fields.get("params") or []
    if not isinstance(params, list) or not all(isinstance(values, list) for values in params):
        raise ValueError(f"params {params!r} is not a list of lists")
    combinations = list(itertools.product(*params))
    results = fields.get("result")
    if results is None:  # asv stores null when every combination failed
        results = [None] * len(combinations)
    if not isinstance(results, list) or len(results) != len(combinations):
        raise ValueError(f"{len(results) if isinstance(results, list) else results!r} results for "
                         f"{len(combinations)} parameter combinations")
    function = name.rsplit(".", 1)[-1]
    names = list((described or {}).get("param_names") or [])
    names += [f"param{index + 1}" for index in range(len(names), len(params))]
    unit = (described or {}).get("unit") or default_unit(function)
    q25s, q75s = fields.get("stats_q_25") or [], fields.get("stats_q_75") or []
    repeats = fields.get("stats_repeat") or []  # samples behind each figure (stats_number: calls per sample)
    rows = []
    for index, (combination, result) in enumerate(zip(combinations, results)):
        value = as_number(result)
        row = {"benchmark": function, "metric": metric_name(function), "unit": unit, "value": value,
               "status": "failed" if result is None else "skipped" if math.isnan(value) else "ok",
               "q25": as_number(q25s[index]) if index < len(q25s) else math.nan,
               "q75": as_number(q75s[index]) if index < len(q75s) else math.nan,
               "samples": as_number(repeats[index]) if index < len(repeats) else math.nan}
        row["spread"] = row["q75"] - row["q25"]
        for param_name, text in zip(names, combination):
            row[param_name] = decode_param(text)
        if isinstance(row.get("implementation"), str):
            row.update(implementation_facts(row["implementation"], implementations or {}))
        rows.append(row)
    return rows


def routing_algorithm_facts(name: str, facts: dict) -> dict:
    """What a run says of a routing algorithm (``routing_algorithms`` in its facts: ``iterative``,
    ``routing_gradients``), else what capsbench's built-ins are (without loading a plugin), else nothing."""
    recorded = (facts.get("routing_algorithms") or {}).get(name)
    if isinstance(recorded, dict):
        return recorded
    if name in routing_algorithms.registered():
        known = routing_algorithms.get(name)
        return {"iterative": known.iterative, "routing_gradients": list(known.routing_gradients)}
    return {}


def mark_not_applicable(rows: list[dict], facts: dict, default_iterations: int) -> None:
    """Give the skipped cells of one benchmark's ``rows`` (one run) that the suite never measures under their
    routing algorithm the status :data:`NOT_APPLICABLE`: for an algorithm that is not iterative, every
    routing-iteration count of the benchmark's grid but :func:`harness.suite.sizes.measured_iterations`
    (``default_iterations``: the run's network's count); a routing gradient the algorithm does not have.
    Measured cells, and cells of an algorithm the run does not describe, keep their status."""
    grid = {row["routing_iterations"] for row in rows if isinstance(row.get("routing_iterations"), int)}
    measured = measured_iterations(grid, default_iterations) if grid else None
    for row in rows:
        algorithm = row.get(ROUTING_ALGORITHM_COLUMN)
        if row["status"] != "skipped" or not isinstance(algorithm, str):
            continue
        described = routing_algorithm_facts(algorithm, facts)
        iterations = row.get("routing_iterations")
        if described.get("iterative") is False and isinstance(iterations, int) and iterations != measured:
            row["status"] = NOT_APPLICABLE
        gradients = described.get("routing_gradients")
        if gradients and row.get(ROUTING_GRADIENT_COLUMN, DEFAULT_ROUTING_GRADIENT) not in gradients:
            row["status"] = NOT_APPLICABLE


def measured_span(payload: dict) -> tuple[pd.Timestamp, pd.Timestamp]:
    """When a run's benchmarks were measured: the earliest start and the latest end (start + duration) asv
    recorded for any benchmark (``started_at`` in ms and ``duration`` in s, columns of each benchmark's entry
    in asv >= 0.5); NaT where it recorded none."""
    columns = payload.get("result_columns") or []
    starts, ends = [], []
    for entry in payload.get("results", {}).values():
        fields = dict(zip(columns, entry)) if isinstance(entry, list) else {}
        start, duration = as_number(fields.get("started_at")), as_number(fields.get("duration"))
        if math.isfinite(start):
            starts.append(start)
            ends.append(start + 1e3 * duration if math.isfinite(duration) else start)
    if not starts:
        return pd.NaT, pd.NaT
    return (pd.to_datetime(min(starts), unit="ms", utc=True), pd.to_datetime(max(ends), unit="ms", utc=True))


def read_run(path: Path, results_root: Path, benchmarks: dict, warnings: list[str]) -> tuple[Run, list[dict]] | None:
    """One results file as a Run and its rows; None (with a warning naming the file) if it is malformed."""
    try:
        payload = read_json(path)
        check_run_file(path, payload)
    except ResultsFileError as error:
        warnings.append(f"warning: {error}; file skipped")
        return None
    machine = str(payload["params"].get("machine") or path.parent.name)
    commit, env = str(payload["commit_hash"]), str(payload["env_name"])
    facts = read_facts(results_root, path.parent.name, commit, env, warnings)
    profile = (facts or {}).get("profile") or DEFAULT_PROFILE
    if profile not in PROFILES:
        warnings.append(f"warning: {path}: profile {profile!r} is not in harness.suite.sizes; "
                        f"assuming {DEFAULT_PROFILE!r}")
        profile = DEFAULT_PROFILE
    date = pd.to_datetime(as_number(payload["date"]), unit="ms", utc=True) if payload["date"] is not None else pd.NaT
    measured_from, measured = measured_span(payload)
    run = Run(machine, commit, env, date, path, profile, PROFILES[profile]["config"],
              profile_assumed=facts is None or "profile" not in facts, facts=facts or {}, measured=measured,
              measured_from=measured_from)
    rows = []
    for name, entry in payload["results"].items():
        if benchmarks and name not in benchmarks:
            warnings.append(f"warning: {path}: benchmark {name} is not in benchmarks.json (no longer in the suite?); "
                            "its parameters are named param1, param2, ...")
        try:
            expanded = expand_benchmark(name, entry, payload["result_columns"], benchmarks.get(name),
                                        run.facts.get("implementations"))
            mark_not_applicable(expanded, run.facts, get_config(run.config_name).routing_iterations)
            rows += expanded
        except ValueError as error:
            warnings.append(f"warning: {path}: benchmark {name}: {error}; benchmark skipped")
    for row in rows:
        row.update(machine=machine, commit=commit, env=env, date=date, profile=profile, config_name=run.config_name,
                   hardware_peak_gflops=(run.facts.get("hardware_peak") or {}).get("gflops"))
    return run, rows


HARDWARE_PEAK = "hardware float32 peak"
BEST_GEMM = "best measured GEMM (hardware peak unknown)"
BEST_GPU_GEMM = "best measured GPU GEMM (no GPU hardware peak derived)"


def run_peaks(table: pd.DataFrame) -> pd.DataFrame:
    """One peak per run and device, the same for every implementation: on the CPU the hardware's float32 peak
    from the run's facts (:func:`harness.measure.peak.hardware_peak`), else (older runs, whose facts lack it) the best
    GEMM any CPU backend measured in the run; on a GPU the best GPU GEMM of the run.  ``peak_source`` says
    which; ``best_gemm_gflops`` (the practical ceiling) stands beside it."""
    gemm = table.loc[table["metric"] == GEMM_PEAK_METRIC].dropna(subset=["value"]).copy()
    gemm["device"] = ["cuda" if backend in GPU_BACKENDS else "cpu" for backend in gemm["backend"]]
    best = gemm.groupby(RUN_KEY + ["device"])["value"].max().rename("best_gemm_gflops").reset_index()
    runs = table[RUN_KEY + ["hardware_peak_gflops"]] if "hardware_peak_gflops" in table else table[RUN_KEY].assign(
        hardware_peak_gflops=math.nan)
    runs = runs.drop_duplicates(RUN_KEY)
    peaks = pd.concat([runs.assign(device="cpu"), runs.assign(device="cuda", hardware_peak_gflops=math.nan)])
    peaks = peaks.merge(best, on=RUN_KEY + ["device"], how="left")
    hardware = pd.to_numeric(peaks["hardware_peak_gflops"], errors="coerce")
    peaks["peak_gflops"] = hardware.where(hardware.notna(), peaks["best_gemm_gflops"]).astype(float)
    peaks["peak_source"] = [
        HARDWARE_PEAK if pd.notna(h) else None if pd.isna(b) else BEST_GPU_GEMM if d == "cuda" else BEST_GEMM
        for h, b, d in zip(hardware, peaks["best_gemm_gflops"], peaks["device"])]
    return peaks.drop(columns=["hardware_peak_gflops"])


def run_peak_sentence(rows: pd.DataFrame, facts: dict) -> str:
    """:func:`harness.measure.peak.peak_sentence` for one run's rows and facts."""
    gemm = rows[rows["metric"] == GEMM_PEAK_METRIC].dropna(subset=["value"]).drop_duplicates("backend")
    return peak_sentence(facts.get("hardware_peak"), dict(zip(gemm["backend"], gemm["value"])))


def add_flops(table: pd.DataFrame) -> pd.DataFrame:
    """FLOPs of each timed phase, the achieved GFLOP/s, and its share of the run's one peak
    (:func:`run_peaks`; NaN where the run has neither the hardware peak nor a GemmPeak result)."""
    table = table.copy()
    table["flops"] = [
        phase_flops(get_config(config_name).replace(routing_iterations=int(iterations)), int(batch))[metric]
        if benchmark.startswith("time_") and metric in PHASES_WITH_FLOPS and pd.notna(batch) and pd.notna(iterations)
        and gradient == DEFAULT_ROUTING_GRADIENT  # harness.measure.flops counts the full routing backward only
        and algorithm == DEFAULT_ROUTING_ALGORITHM  # and dynamic routing's work only
        else math.nan
        for benchmark, metric, batch, iterations, config_name, gradient, algorithm in zip(
            table["benchmark"], table["metric"], table["batch_size"], table["routing_iterations"], table["config_name"],
            table[ROUTING_GRADIENT_COLUMN], table[ROUTING_ALGORITHM_COLUMN])
    ]
    table["gflops_per_s"] = table["flops"] / table["value"] / 1e9
    table = table.drop(columns=["peak_gflops", "peak_source", "best_gemm_gflops"], errors="ignore")
    table = table.merge(run_peaks(table), on=RUN_KEY + ["device"], how="left")
    table["pct_of_peak"] = 100 * table["gflops_per_s"] / table["peak_gflops"]
    return table[TIDY_COLUMNS + [column for column in table.columns if column not in TIDY_COLUMNS]]


def tidy_frame(rows: list[dict]) -> pd.DataFrame:
    """The rows as the tidy table: the documented columns first, any other parameter after them.  Every row
    has a ``routing_gradient`` and a ``routing_algorithm``: the benchmark's parameter, else ``full`` and
    ``dynamic`` (results and benchmarks without the parameter computed the only behaviour there was)."""
    table = pd.DataFrame(rows)
    for column in TIDY_COLUMNS:
        if column not in table:
            table[column] = math.nan
    for column, default in ((ROUTING_GRADIENT_COLUMN, DEFAULT_ROUTING_GRADIENT),
                            (ROUTING_ALGORITHM_COLUMN, DEFAULT_ROUTING_ALGORITHM)):
        table[column] = table[column].fillna(default) if column in table else default
    extra = [column for column in table.columns if column not in TIDY_COLUMNS]
    table = table[TIDY_COLUMNS + extra]
    for column in PARAMETER_COLUMNS:
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    for column in ("value", "spread", "q25", "q75", "samples", "flops", "peak_gflops"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    return table


def run_files(asv_dir: Path, machine: str | None) -> list[Path]:
    """Every results file under ``asv_dir`` (``<machine>/<commit>-<env>.json``), optionally of one machine."""
    folders = [asv_dir / machine] if machine else sorted(p for p in asv_dir.iterdir() if p.is_dir())
    return sorted(path for folder in folders if folder.is_dir() for path in folder.glob("*.json")
                  if path.name != "machine.json")


def machine_names(asv_dir: Path) -> list[str]:
    """The machine folders asv has written under ``asv_dir``."""
    return sorted(p.name for p in asv_dir.iterdir() if p.is_dir()) if asv_dir.is_dir() else []


def load_asv(results_root: str | Path, machine: str | None = None, repository: str | Path | None = None) -> AsvResults:
    """Read every asv results file under ``<results_root>/asv`` (of ``machine`` only, if given); the runs
    oldest first by :func:`harness.suite.run_order.order_runs`, with git asked in ``repository`` (default: the
    repository that holds ``results_root``, where there is one)."""
    results_root = Path(results_root)
    asv_dir = results_root / ASV_RESULTS_SUBDIR
    warnings: list[str] = []
    ancestry = Ancestry(results_root if repository is None else repository)
    if not asv_dir.is_dir():
        return AsvResults(tidy_frame([]), [], {}, warnings, ancestry)
    benchmarks = read_benchmarks(asv_dir, warnings) if run_files(asv_dir, machine) else {}
    runs, rows, machines = [], [], {}
    for path in run_files(asv_dir, machine):
        read = read_run(path, results_root, benchmarks, warnings)
        if read is None:
            continue
        runs.append(read[0])
        rows += read[1]
        machine_file = path.parent / "machine.json"
        if read[0].machine not in machines and machine_file.exists():
            try:
                machines[read[0].machine] = read_json(machine_file)
            except ResultsFileError as error:
                warnings.append(f"warning: {error}; machine description skipped")
    runs = order_runs(runs, ancestry)
    table = add_flops(tidy_frame(rows)) if rows else tidy_frame([])
    return AsvResults(table, runs, machines, warnings, ancestry)
