"""python -m harness.readme: the measured figures of README and docs/, regenerated from the shipped results.

A figure typed by hand drifts from the run it came from; so every table of measured figures in README.md and
in the manual beside it (``docs/*.md``) sits between two markers and is written by this command from
``results/``::

    <!-- generated: profile -->
    ... (whatever this command last wrote) ...
    <!-- end generated: profile -->

An opening marker may name the run it wants, ``<!-- generated: headline commit=fb4b147f machine=vm -->``.
The blocks (:data:`BLOCKS`): ``headline`` (one asv run: step times with their spread, images/s, % of the
machine peak, forward, backward, routing share; and where the run measured another routing algorithm than
dynamic, its train step and routing beside dynamic routing's), ``routing_algorithms`` (that second part
alone, of a run a page names where its headline is another run), ``profile`` (the largest layers of each
implementation's training step), ``training`` (every training run), ``scaling`` (data-parallel scaling)
and ``environment`` (the environment variables of :mod:`harness.settings`, not a measurement).  A block may
sit in README or in any page of ``docs/``, each name in one place only (two copies of one table would be two
places to look).
``--check`` rewrites nothing and exits 1 naming the pages and blocks that differ from what the results say;
the tests run it, so README, docs/ and ``results/`` cannot disagree unnoticed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from harness import cli
from harness.errors import EXIT_FAILURE, UserError
from harness.reporting.formatting import NA, fmt, fmt_spread, markdown_table
from harness.reporting.ranking import (
    FAILED,
    NOT_MEASURED,
    RANKING_RULE,
    parity_cell,
    parity_mark,
    parity_table,
    parity_tolerance,
    ranking_sentence,
    ranking_table,
)
from harness.reporting.sections import distributed_section, iterative_algorithms, ratio_cell
from harness.reporting.tables import (
    distributed_table,
    profile_rows,
    routing_algorithm_table,
    run_rows,
    step_iterations,
    summary_table,
    table_algorithms,
    timed_under_dynamic_alone,
    training_table,
)
from harness.results import load_profile_result, load_scaling_results, load_training_results, write_text_atomic
from harness.settings import ENVIRONMENT, PROFILE_SUBDIR, RESULTS_DIR, SCALING_SUBDIR, TRAINING_SUBDIR
from harness.suite.asv_results import load_asv, run_peak_sentence

OPEN = re.compile(r"<!-- generated: (?P<name>[\w-]+)(?P<args>(?: [\w-]+=[^ ]+)*) -->")
CLOSE = "<!-- end generated: {name} -->"
LARGEST_LAYERS = 3


class ReadmeError(UserError, ValueError):
    """README's markers or the results a block needs are not what this command expects (one line, exit
    status 1)."""

    status = EXIT_FAILURE


def chosen_run(root: Path, commit: str | None, machine: str | None, block: str):
    """The asv results under ``root`` and the run a ``block`` names: at ``commit`` (prefix; default the newest,
    :mod:`harness.suite.run_order`) on ``machine``.  Raises :class:`ReadmeError` where there is none."""
    asv = load_asv(root, machine)
    runs = [run for run in asv.runs if commit is None or run.commit.startswith(commit)]
    if not runs:
        raise ReadmeError(f"{block}: no asv run {'at commit ' + commit if commit else ''} under {root}/asv"
                          + (f" for machine {machine}" if machine else "") + "; run asv and `capsbench keep` first")
    return asv, runs[-1]  # load_asv orders them oldest first (harness.suite.run_order)


def headline_block(root: Path, commit: str | None = None, machine: str | None = None) -> str:
    """The asv run at ``commit`` (prefix; default the newest, :mod:`harness.suite.run_order`) on ``machine``: per
    implementation and batch size, the training step (median, interquartile range, samples), images/s, % of the
    machine's peak, forward, backward, routing share, host memory sampled in a step and parity (the check's
    largest error, :mod:`harness.reporting.ranking`: an implementation without a passing figure is marked wherever it is
    named, and one that FAILED is listed last in its batch and not ranked); then the ranking per batch size,
    with the pairs the samples cannot rank; implementations without a result are left out."""
    asv, run = chosen_run(root, commit, machine, "headline")
    rows = run_rows(asv.table, run)
    iterations, _ = step_iterations(rows, run.config_name)
    frame = summary_table(rows, iterations)
    parity = parity_table(rows)
    status = parity.set_index("implementation")["parity"]
    frame = frame[frame["train_step"].notna()].assign(
        parity=lambda frame: [status.get(name, NOT_MEASURED) for name in frame["implementation"]],
        failed=lambda frame: frame["parity"] == FAILED)
    frame = frame.sort_values(["batch_size", "failed", "train_step"])  # a FAILED one never heads its batch

    def timing(row, metric):
        return fmt_spread(row[metric], row[f"{metric}_q25"], row[f"{metric}_q75"], row[f"{metric}_samples"], "ms")

    cells = pd.DataFrame({
        "implementation": [name + parity_mark(state) for name, state in zip(frame["implementation"], frame["parity"])],
        "batch": [fmt(v, "int") for v in frame["batch_size"]],
        "train step ms (q25–q75, samples)": [timing(row, "train_step") for _, row in frame.iterrows()],
        "images/s": [fmt(v, "rate") for v in frame["images_per_second"]],
        "% of peak": [fmt(v, "pct100") for v in frame["train_pct_of_peak"]],
        "forward ms": [fmt(v, "ms") for v in frame["forward"]],
        "backward ms": [fmt(v, "ms") for v in frame["backward"]],
        "routing fwd+bwd share": [fmt(v, "pct") for v in frame["routing_share"]],
        "host memory MiB": [fmt(v, "mib") for v in frame["host_memory"]],
        "parity (max rel error)": [parity_cell(state, error) for state, error in zip(frame["parity"],
                                                                                     frame["max_rel_error"])],
    })
    intro = (f"asv run `{run.label}` ({run.profile} profile, {run.config_name} network, float32, "
             f"{iterations} routing iterations). {run_peak_sentence(rows, run.facts)}")
    ranking = (f" Ranking by train step per batch size, fastest first ({RANKING_RULE} Parity passes at or below "
               f"{parity_tolerance():.0e}, the widest tolerance of harness.check; docs/report.md gives both rules): "
               + ranking_sentence(ranking_table(frame, parity)))
    return intro + ranking + "\n\n" + markdown_table(cells, text_columns=1) + routing_algorithms_lines(
        run_rows(asv.table, run, routing_algorithm=None), iterations, run.facts, status)


def routing_algorithms_block(root: Path, commit: str | None = None, machine: str | None = None) -> str:
    """The routing algorithms of the asv run at ``commit`` on ``machine`` (chosen as :func:`headline_block`
    chooses): its train step and routing forward + backward under each algorithm it measured beside dynamic
    routing's, with spreads and ratios (:func:`routing_algorithms_lines`), for a page whose headline is
    another run.  Raises :class:`ReadmeError` where that run measured dynamic routing alone."""
    asv, run = chosen_run(root, commit, machine, "routing_algorithms")
    rows = run_rows(asv.table, run)
    iterations, _ = step_iterations(rows, run.config_name)
    status = parity_table(rows).set_index("implementation")["parity"]
    lines = routing_algorithms_lines(run_rows(asv.table, run, routing_algorithm=None), iterations, run.facts, status)
    if not lines:
        raise ReadmeError(f"routing_algorithms: asv run {run.label} measured dynamic routing alone; measure "
                          "another algorithm (docs/benchmarks.md) or name another run")
    return (f"asv run `{run.label}` ({run.profile} profile, {run.config_name} network, float32). "
            + run_peak_sentence(rows, run.facts) + lines)


def routing_algorithms_lines(rows: pd.DataFrame, iterations: int, facts: dict, parity) -> str:
    """Where the headline's run measured a routing algorithm besides dynamic routing: a paragraph and a table
    per batch and implementation (in the order of dynamic routing's train step, each name with its parity
    mark from ``parity``, implementation -> state) of the train step and routing forward + backward alone under
    each, with their spreads and the ratio to dynamic (:func:`harness.reporting.tables.routing_algorithm_table`);
    "" where it measured dynamic routing alone."""
    frame = routing_algorithm_table(rows, iterations, iterative_algorithms(rows, facts))
    if frame.empty:
        return ""
    frame = frame.sort_values(["batch_size", "train_step_dynamic"], kind="stable")
    others = table_algorithms(frame)[1:]
    cells = {"implementation": [name + parity_mark(parity.get(name, NOT_MEASURED)) for name in frame["implementation"]],
             "batch": [fmt(v, "int") for v in frame["batch_size"]]}
    for metric, heading in (("train_step", "train step"), ("routing_backward", "routing fwd+bwd")):
        if frame[[f"{metric}_{algorithm}" for algorithm in others]].isna().all().all():
            continue  # measured under dynamic routing alone: the table above has it
        for algorithm in ["dynamic", *others]:
            cells[f"{heading} {algorithm} ms"] = [
                fmt_spread(*values, "ms") for values in zip(*(frame[f"{metric}_{algorithm}{suffix}"] for suffix in (
                    "", "_q25", "_q75", "_samples")))]
        for algorithm in others:
            cells[f"{heading} {algorithm} / dynamic"] = [
                ratio_cell(*values) for values in zip(*(frame[f"{metric}_ratio_{algorithm}{suffix}"] for suffix in (
                    "", "_low", "_high")))]
    alone = "; ".join(f"under dynamic routing alone (not {algorithm}): {', '.join(names)}"
                      for algorithm, names in timed_under_dynamic_alone(rows, frame).items() if names)
    intro = (f"The same run under each routing algorithm it measured ({', '.join(others)} beside dynamic routing at "
             f"{iterations} iterations; the report's section \"Routing algorithms\" has every figure it measured): "
             "ms with q25–q75 and samples, ratio = algorithm / dynamic with its range over the two interquartile "
             "ranges" + (f"; {alone}" if alone else "") + ".")
    return "\n\n" + intro + "\n\n" + markdown_table(pd.DataFrame(cells), text_columns=1)


def profile_block(root: Path) -> str:
    """Per profiled implementation: the profiled step and its largest layers (layer, phase, time, share of
    the step, % of the machine's peak)."""
    warnings: list[str] = []
    profile = load_profile_result(root / PROFILE_SUBDIR, warnings)
    if profile is None:
        raise ReadmeError(f"profile: no readable profile under {root / PROFILE_SUBDIR} "
                          f"({'; '.join(warnings) or 'run capsbench profile --out ' + str(root / PROFILE_SUBDIR)})")
    lines = []
    for name in profile.implementations():
        rows = profile_rows(profile, name)
        about = profile.about(name)
        largest = rows.dropna(subset=["time_s"]).nlargest(LARGEST_LAYERS, "time_s")
        step = about.get("unprofiled_step_s")
        for rank, (_, row) in enumerate(largest.iterrows()):
            lines.append({
                "implementation": name if rank == 0 else "",
                "batch": fmt(row["batch_size"], "int") if rank == 0 else "",
                "step ms (unprofiled)": fmt(step, "ms") if rank == 0 and isinstance(step, (int, float)) else "",
                "layer, phase": f"{row['layer']}, {row['phase']}",
                "ms per step (q25–q75)": fmt_spread(row["time_s"], row["time_q25_s"], row["time_q75_s"],
                                                    row["steps"], "ms", count=False),
                "share of step": fmt(row["share"], "pct"),
                "% of peak": fmt(row["pct_of_peak"], "pct100"),
            })
    steps = sorted({int(n) for n in profile.frame["steps"].dropna()})
    intro = (f"`capsbench profile` ({', '.join(map(str, steps))} profiled steps after the warm-up; "
             f"`{root.name}/{PROFILE_SUBDIR}`), the {LARGEST_LAYERS} largest layers of each implementation's step:")
    return intro + "\n\n" + markdown_table(pd.DataFrame(lines), text_columns=4)


def accuracy(value) -> str:
    """Test accuracy to two decimals, as the paper's 99.75 % and its peers' 99.66 % are written."""
    return NA if pd.isna(value) else f"{100 * value:.2f} %"


def training_block(root: Path) -> str:
    """Every training run: implementation, the machine's CPU, device, images, schedule, routing gradient,
    epochs, time, images/s, best and final accuracy."""
    warnings: list[str] = []
    records = load_training_results(root / TRAINING_SUBDIR, warnings)
    if not records:
        raise ReadmeError(f"training: no readable training results under {root / TRAINING_SUBDIR}"
                          + (f" ({'; '.join(warnings)})" if warnings else ""))
    frame = training_table(records).sort_values(["train_images", "best_test_accuracy"], ascending=False)
    machines = {path.name: (record.get("machine") or {}).get("cpu") or "?" for path, record in records}
    cells = pd.DataFrame({
        "run": [f"`{name}`" for name in frame["file"]], "implementation": frame["implementation"],
        "machine": [machines[name] for name in frame["file"]],
        "device": frame["device"], "ranks": [fmt(v, "int") for v in frame["ranks"]],
        "training / test images": [f"{int(a):,} / {int(b):,}" for a, b in zip(frame["train_images"],
                                                                             frame["test_images"])],
        "schedule": frame["schedule"], "routing gradient": frame["routing_gradient"],
        "epochs": [f"{done}/{asked}" for done, asked in zip(frame["epochs"], frame["epochs_requested"])],
        "training s": [fmt(v, "num") for v in frame["train_seconds"]],
        "images/s": [fmt(v, "rate") for v in frame["images_per_second"]],
        "best test accuracy": [accuracy(v) for v in frame["best_test_accuracy"]],
        "final test accuracy": [accuracy(v) for v in frame["final_test_accuracy"]],
    })
    return markdown_table(cells, text_columns=8)


def scaling_block(root: Path) -> str:
    """The data-parallel scaling results, as the report shows them."""
    warnings: list[str] = []
    records = load_scaling_results(root / SCALING_SUBDIR, warnings)
    if not records:
        raise ReadmeError(f"scaling: no readable scaling results under {root / SCALING_SUBDIR}")
    return distributed_section(distributed_table(records))


def environment_block(root: Path) -> str:
    """The table of every environment variable capsbench reads, from :data:`harness.settings.ENVIRONMENT`
    (``root`` unused: the table is of the code, not of results)."""
    rows = [(f"`{name}`", setting.sets, setting.explained_in) for name, setting in ENVIRONMENT.items()]
    return markdown_table(pd.DataFrame(rows, columns=["variable", "what it sets", "where it is explained"]),
                          text_columns=3)


BLOCKS = {"headline": headline_block, "routing_algorithms": routing_algorithms_block,
          "profile": profile_block, "training": training_block,
          "scaling": scaling_block, "environment": environment_block}


def regenerate(text: str, root: Path, page: str = "README") -> tuple[str, list[str]]:
    """``page``'s text with every generated block rewritten from ``root``, and the names of those that changed.
    ``page`` names the file in errors."""
    out, changed, position = [], [], 0
    for match in OPEN.finditer(text):
        if match.start() < position:
            continue
        name = match["name"]
        if name not in BLOCKS:
            raise ReadmeError(f"{page} names an unknown generated block {name!r}: known are {', '.join(BLOCKS)}")
        close = CLOSE.format(name=name)
        end = text.find(close, match.end())
        if end < 0:
            raise ReadmeError(f"{page}'s generated block {name!r} has no closing marker: add {close!r}")
        args = dict(pair.split("=", 1) for pair in match["args"].split())
        try:
            body = BLOCKS[name](root, **args)
        except TypeError:
            raise ReadmeError(f"{page}'s generated block {name!r} takes no argument(s) {', '.join(args)}") from None
        new = f"\n{body}\n"
        if text[match.end():end] != new:
            changed.append(name)
        out += [text[position:match.end()], new]
        position = end
    out.append(text[position:])
    return "".join(out), changed


def block_names(text: str) -> list[str]:
    """The names of the generated blocks a page opens, in order."""
    return [match["name"] for match in OPEN.finditer(text)]


def pages(readme: Path, docs: Path | None) -> list[Path]:
    """README and every Markdown page of the manual (``docs/`` beside README unless ``docs`` says; a README
    without one has no manual)."""
    if docs is None:
        docs = readme.parent / "docs"
        if not docs.is_dir():
            return [readme]
    elif not docs.is_dir():
        raise ReadmeError(f"--docs {docs} is not a folder: name the folder of the manual's pages")
    return [readme, *sorted(docs.glob("*.md"))]


def regenerate_pages(paths: list[Path], root: Path) -> dict[Path, tuple[str, list[str]]]:
    """Per page, its text with every generated block rewritten from ``root`` and the blocks that changed; a
    block name opened in two places (two pages, or twice in one) is an error naming both."""
    where: dict[str, Path] = {}
    result = {}
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for name in block_names(text):
            if name in where:
                raise ReadmeError(f"generated block {name!r} is in {where[name]} and again in {path}: "
                                  "keep one of them")
            where[name] = path
        result[path] = regenerate(text, root, str(path))
    return result


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=cli.prog("readme"), description=cli.description(__doc__))
    parser.add_argument("--readme", type=Path, default=Path("README.md"), help="the file (default: README.md)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="the folder of the manual's pages, every *.md in it checked too "
                             "(default: docs/ beside --readme, where there is one)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR,
                        help="the results the figures come from (default: results, what this repository ships)")
    parser.add_argument("--check", action="store_true",
                        help="rewrite nothing; exit 1 naming the blocks that differ from the results "
                             "(default: rewrite them)")
    return parser


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        regenerated = regenerate_pages(pages(args.readme, args.docs), args.results)
    except OSError as error:
        raise ReadmeError(str(error)) from None
    stale = {path: changed for path, (_, changed) in regenerated.items() if changed}
    described = "; ".join(f"{path}: {', '.join(changed)}" for path, changed in stale.items())
    if args.check:
        if stale:
            raise UserError(f"generated block(s) differ from {args.results} ({described}): run `capsbench readme`",
                            EXIT_FAILURE)
        print(f"{args.readme} and {len(regenerated) - 1} page(s) of the manual: every generated block agrees "
              f"with {args.results}")
        return 0
    for path in stale:
        write_text_atomic(path, regenerated[path][0])
    count = sum(len(changed) for changed in stale.values())
    print(f"{len(regenerated)} page(s): {count} generated block(s) rewritten" + (f" ({described})" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
