"""python -m harness.check: every implementation against the float64 reference, number by number.

The reference is ``torch-vectorised`` in float64 on the CPU.  Every implementation is built from the same
canonical parameters and fed the same seeded batches; compared are the class-capsule lengths, the
reconstructions (training and inference mask), the loss, every parameter gradient, every parameter after
three Adam steps on three different batches (one step cannot tell an optimizer that resets its moment
estimates from one that keeps them; the steps follow a fast-decaying learning-rate schedule, so a schedule
applied wrongly shows), and what the routing benchmarks time: the prediction vectors u_hat, and routing
alone (v, and the gradient with respect to u_hat of routing forward and backward) at 1, the network's and 5
iterations; a routing algorithm that does not iterate (:attr:`harness.routing_algorithms.RoutingAlgorithm.iterative`
False: self-attention) has routing alone checked once, under names without an iteration count.  The gradient
of an algorithm's own parameters (self-attention's ``digit.bias``) is compared as ``grad digit.bias`` of the
network: routing alone gives the gradient of u_hat only (the contract's ``routing_backward``).

``--routing-algorithm NAME`` checks every implementation that computes the algorithm
(:meth:`harness.registry.ImplementationInfo.computes`) against the reference computing the same algorithm; the
others are skipped with the reason.  A plugin's algorithm (:mod:`harness.routing_algorithms`) is validated
before any implementation is compared: one without a ``reference`` cannot be checked (its reference is what
``torch-vectorised`` computes it by) and is rejected in one line (exit status 2); and the reference run in
float32 and in float64 (``torch-vectorised`` at both dtypes, the same inputs) must agree within the float32
tolerances, else the algorithm is rejected with the quantity that disagrees (exit status 1): a reference
that is not even stable across dtypes cannot judge an implementation to float32's tolerances.  Since
``torch-vectorised`` computes a plugin's algorithm by that reference, the comparison of the plugin's own
implementation with ``torch-vectorised`` float64 is its check against its reference.

``--routing-gradient final`` checks every implementation that declares the routing gradient
``final`` (harness.spec) against the reference computing ``final``; the others are skipped with the
reason.  At the canonical parameters the two settings' gradients differ by about 1e-6 relative: far above
the float64 tolerance, so an implementation that lets the gradient through the early iterations while
claiming ``final`` fails in float64 (below float32's tolerance, which cannot tell them apart at the
canonical parameters; the routing case below tells them apart in float32 too).

The routing case.  At the canonical parameters u_hat is so short (digit.weight ~ N(0, 0.01^2)) that the
agreements u_hat . v are below 1e-6 and routing moves the coupling coefficients from 1/J by less than 1e-6 of
1/J (small network): below float32's rounding, so a routing that never updates its logits, or runs one
iteration more or fewer, agrees with the reference in float32.  The check therefore repeats the network
(outputs, loss, every gradient) and routing alone (v and its gradient at every checked iteration count)
with digit.weight, and so u_hat, multiplied by :data:`ROUTING_SCALE`, where the agreements are of order one
and the couplings of the last iteration range from a fraction of 1/J to several times it; those quantities
are named with the case, ``W x200`` (:func:`routing_case_name`).  The same scale makes self-attention route on
the small network: its couplings softmax_j(a_ij) range from 4e-4 to 0.96 at x200 (1e-4 of 1/J from uniform at
the canonical parameters).  But self-attention sums over all N input capsules at once, in its agreements a_ij
(which grow as N x scale^2) and in s_j (N x scale), whose squash saturates: on the paper network (N = 1152,
8 times the small network's) x200 makes the couplings one-hot and every capsule 1 long, and the float32
reference disagrees with its float64 self there (ties of the longest capsule, gradients through a saturated
squash).  So its scale shrinks with N, as (144 / N)^(2/3) (:func:`routing_scale`): x200 on the small network,
x50 on the paper network, where the couplings range from 0.015 to 0.52 and no capsule is longer than 0.999.
In the routing case every parameter the routing algorithm adds (self-attention's ``digit.bias``)
also moves from its initial value by a seeded draw, N(0, :data:`ROUTING_PARAMETER_STD` ^ 2): at its initial
zero a bias cannot tell an implementation that adds it after the softmax (the definition, harness.spec) from
one that adds it before, nor a transposed or misaligned bias from the right one, nor a bias left out.
docs/correctness.md gives the measurements behind the scale and the bias.

The error of a quantity is the normwise relative error ``max|x - ref| / max|ref|``: elementwise relative
errors are meaningless for entries that are zero up to rounding, and a max-norm never averages a bad entry
away.  Tolerances (:data:`harness.tolerances.TOLERANCES`) are per dtype and kind of quantity.  The parameter
tolerance in float32 is wider than the others for a reason that is not a bug: Adam divides each gradient by
``sqrt(v) + eps`` with eps = 1e-8, so for gradient entries near or below eps, float32 rounding of the
gradient reaches the parameter multiplied by lr / eps; a real Adam bug (moments reset between steps, bias
correction missing) moves parameters by O(lr), errors of 0.1 to 1.  docs/correctness.md lists the errors measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from harness import cli, options, registry, routing_algorithms
from harness.data import synthetic_batch
from harness.errors import EXIT_FAILURE, UserError
from harness.params import DIGIT_WEIGHT, init_parameters, parameter_shapes, routing_parameter_shapes
from harness.spec import SMALL, CapsNetConfig, LearningRateSchedule, get_config
from harness.tolerances import TOLERANCES

REFERENCE = "torch-vectorised"
REFERENCE_DTYPE = "float64"
ADAM_STEPS = 3
CHECK_BATCH_SIZE = 8
CHECK_CONFIG = "small"
CHECK_CONFIG_WHY = "the same code computes every size, and the small network checks in seconds"
FORWARD_SEED = 0  # seed of the batch for outputs and gradients; the Adam batches follow it
ROUTING_SEED = 7  # seed of the gradient with respect to v fed to routing alone
EXTRA_ROUTING_ITERATIONS = (1, 5)  # routing alone is also checked here, besides the network's own count
# halves the learning rate at every step, so that an implementation that ignores the schedule fails
CHECK_SCHEDULE = LearningRateSchedule("check", decay_rate=0.5, decay_steps=1)
# digit.weight (so u_hat) is multiplied by this in the routing case, where routing moves the couplings: on the
# small network the largest agreement of the first iteration is then 0.8 and the last iteration's couplings
# move from 1/J by up to 3.4 times 1/J (4e-7 of 1/J at the canonical parameters); at x100 they moved by 0.4 times
# at most, and from x300 the paper network's couplings are nearly one-hot (docs/correctness.md)
ROUTING_SCALE = 200
# the routing algorithms whose routing case scales digit.weight by ROUTING_SCALE x (SCALE_INPUTS / N)^(2/3) instead:
# self-attention, which sums over all N input capsules at once (see the module docstring and routing_scale)
SCALE_SHRINKS_WITH_INPUTS = ("self-attention",)
SCALE_INPUTS = SMALL.num_primary_caps  # 144: where every routing algorithm's scale is ROUTING_SCALE
# the routing case draws each parameter a routing algorithm adds (self-attention's digit.bias, zero at the start)
# from N(initial, std^2): half of 1/J on the small and paper networks, the size of the couplings the bias is added to
ROUTING_PARAMETER_STD = 0.05
ROUTING_PARAMETER_SEED = 11
QUANTITY_WIDTH = 36  # the table's quantity column: the longest name, "reconstructions (inference), W x200"

def max_relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    """max|value - reference| / max|reference| (absolute error where the reference is all zero)."""
    value = np.asarray(value, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if value.shape != reference.shape:
        raise ValueError(f"shape {value.shape} differs from the reference's {reference.shape}")
    if not np.all(np.isfinite(value)):
        return float("inf")
    scale = float(np.max(np.abs(reference), initial=0.0))
    error = float(np.max(np.abs(value - reference), initial=0.0))
    return error / scale if scale > 0 else error


@dataclass
class Observation:
    """Everything the check compares, as float64 NumPy arrays keyed by quantity name."""

    values: dict[str, np.ndarray] = field(default_factory=dict)

    @staticmethod
    def kind(quantity: str) -> str:
        if quantity.startswith(("grad ", "routing grad")):
            return "gradient"
        if quantity.startswith("param "):
            return "parameter"
        return "output"


def routing_iteration_counts(config: CapsNetConfig) -> list[int | None]:
    """The iteration counts routing alone is checked at: 1, the network's and 5 for an iterative routing
    algorithm, ``[None]`` (once, no count) for one that does not iterate (self-attention)."""
    if not routing_algorithms.of(config).iterative:
        return [None]
    return sorted({config.routing_iterations, *EXTRA_ROUTING_ITERATIONS})


def routing_label(count: int | None) -> str:
    """What routing alone's quantities at ``count`` iterations end with: `` (3 it.)``, nothing for None."""
    return "" if count is None else f" ({count} it.)"


def routing_scale(config: CapsNetConfig) -> int:
    """What the routing case multiplies digit.weight by: :data:`ROUTING_SCALE`, or, for an algorithm of
    :data:`SCALE_SHRINKS_WITH_INPUTS`, that times (:data:`SCALE_INPUTS` / N)^(2/3) with N the network's input
    capsules, rounded (self-attention: 200 on the small network, 50 on the paper network)."""
    if config.routing_algorithm not in SCALE_SHRINKS_WITH_INPUTS:
        return ROUTING_SCALE
    return round(ROUTING_SCALE * (SCALE_INPUTS / config.num_primary_caps) ** (2 / 3))


def routing_case_name(config: CapsNetConfig) -> str:
    """What the routing case's quantities are named with: ``W x200`` (:func:`routing_scale`)."""
    return f"W x{routing_scale(config)}"


def in_routing_case(quantity: str, config: CapsNetConfig) -> str:
    """The name of ``quantity`` measured in the routing case of ``config`` (``lengths, W x200``)."""
    return f"{quantity}, {routing_case_name(config)}"


def quantities(config: CapsNetConfig) -> list[str]:
    """The name of every quantity the check compares, in order: at the canonical parameters, then the routing
    case's (the network's outputs, loss and gradients, and routing alone, without Adam's steps)."""
    names = parameter_shapes(config)
    routing = [f"routing {what}{routing_label(count)}" for count in routing_iteration_counts(config)
               for what in ("v", "grad u_hat")]
    outputs = ["lengths", "reconstructions", "reconstructions (inference)", "loss"]
    gradients = [f"grad {name}" for name in names]
    routing_case = [in_routing_case(quantity, config) for quantity in [*outputs, *routing, *gradients]]
    return [*outputs, "u_hat", *routing, *gradients, *[f"param {name}" for name in names], *routing_case]


def check_batches(config: CapsNetConfig, batch_size: int = CHECK_BATCH_SIZE):
    """The fixed batch for outputs and gradients, then one batch per Adam step."""
    return [synthetic_batch(config, batch_size, seed=FORWARD_SEED + k) for k in range(1 + ADAM_STEPS)]


def drawn_routing_parameters(config: CapsNetConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``params`` (float64) with every parameter ``config``'s routing algorithm adds moved from its value by a
    seeded draw from N(0, :data:`ROUTING_PARAMETER_STD` ^ 2) (the same numbers in every call): self-attention's
    digit.bias, zero at the start, then tells a bias added after the softmax from one added before it, and a
    transposed or dropped bias from the right one.  The other parameters are returned as they were."""
    rng = np.random.default_rng(ROUTING_PARAMETER_SEED)
    drawn = dict(params)
    for name, shape in routing_parameter_shapes(config).items():
        drawn[name] = params[name] + rng.normal(0.0, ROUTING_PARAMETER_STD, shape)
    return drawn


def routing_case_parameters(config: CapsNetConfig, dtype: str) -> dict[str, np.ndarray]:
    """The canonical parameters with digit.weight multiplied by :func:`routing_scale` and the routing
    algorithm's own parameters drawn (:func:`drawn_routing_parameters`), in float64, then cast: u_hat is that
    much longer, so routing moves the couplings, and a bias is not zero (see the module docstring)."""
    params = init_parameters(config, dtype=np.float64)
    params[DIGIT_WEIGHT] = params[DIGIT_WEIGHT] * routing_scale(config)
    params = drawn_routing_parameters(config, params)
    return {name: np.ascontiguousarray(value, dtype=dtype) for name, value in params.items()}


def observe_routing(name: str, config: CapsNetConfig, dtype: str, batch, put) -> None:
    """Routing alone at each checked iteration count (once for an algorithm that does not iterate): v, and the
    gradient of routing w.r.t. u_hat, on the u_hat of the canonical parameters, then on that of the routing
    case's (u_hat x :func:`routing_scale`, made by the implementation itself, in its own layout and dtype, and
    routed with the routing case's drawn routing parameters)."""
    images, labels = batch
    grad_v = np.random.default_rng(ROUTING_SEED).standard_normal((len(labels), config.num_classes,
                                                                  config.digit_caps_dim))
    for count in routing_iteration_counts(config):
        counted = config if count is None else config.replace(routing_iterations=count)
        for named, params in ((str, init_parameters(counted, dtype=dtype)),
                              (lambda quantity: in_routing_case(quantity, config),
                               routing_case_parameters(counted, dtype))):
            impl = registry.create(name, counted, params, dtype)
            u_hat = impl.prediction_vectors(impl.to_device(images, labels))
            if count in (None, config.routing_iterations) and named is str:
                put("u_hat", impl.canonical_u_hat(u_hat))
            put(named(f"routing v{routing_label(count)}"), impl.to_numpy(impl.routing_forward(u_hat)))
            put(named(f"routing grad u_hat{routing_label(count)}"),
                impl.canonical_u_hat(impl.routing_backward(u_hat, impl.from_numpy(grad_v))))


def observe_network(impl, batch, put) -> None:
    """Outputs (lengths, reconstructions under the training and the inference mask), the loss and every
    parameter gradient of one forward and backward pass."""
    lengths, reconstructions = impl.forward(batch, train=True)
    put("lengths", impl.to_numpy(lengths))
    put("reconstructions", impl.to_numpy(reconstructions))
    put("reconstructions (inference)", impl.to_numpy(impl.forward(batch, train=False)[1]))
    put("loss", np.asarray(impl.to_numpy(impl.forward_loss(batch))))
    impl.backward()
    for param_name, gradient in impl.gradients().items():
        put(f"grad {param_name}", gradient)


def observe(name: str, config: CapsNetConfig, dtype: str, batch_size: int = CHECK_BATCH_SIZE) -> Observation:
    """Run one implementation through the check's fixed sequence and collect every compared quantity."""
    impl = registry.create(name, config, init_parameters(config, dtype=dtype), dtype)
    impl.set_schedule(CHECK_SCHEDULE)
    (images, labels), *adam_batches = check_batches(config, batch_size)
    observation = Observation()
    put = observation.values.__setitem__
    observe_network(impl, impl.to_device(images, labels), put)
    for step_images, step_labels in adam_batches:
        impl.train_step(impl.to_device(step_images, step_labels))
    for param_name, value in impl.parameters().items():
        put(f"param {param_name}", value)
    observe_routing(name, config, dtype, (images, labels), put)
    routed = registry.create(name, config, routing_case_parameters(config, dtype), dtype)
    observe_network(routed, routed.to_device(images, labels),
                    lambda quantity, value: put(in_routing_case(quantity, config), value))
    observation.values = {quantity: observation.values[quantity] for quantity in quantities(config)
                          if quantity in observation.values}
    return observation


_reference_cache: dict[tuple, Observation] = {}


def reference_observation(config: CapsNetConfig, batch_size: int = CHECK_BATCH_SIZE) -> Observation:
    key = (config, batch_size)
    if key not in _reference_cache:
        _reference_cache[key] = observe(REFERENCE, config, REFERENCE_DTYPE, batch_size)
    return _reference_cache[key]


@dataclass(frozen=True)
class Row:
    implementation: str
    dtype: str
    quantity: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance


def compare(name: str, dtype: str, observation: Observation, reference: Observation) -> list[Row]:
    """One row per reference quantity; a quantity missing or of another shape has an infinite error."""
    tolerances = TOLERANCES[dtype]
    rows = []
    for quantity, expected in reference.values.items():
        value = observation.values.get(quantity)
        same_shape = value is not None and np.shape(value) == np.shape(expected)
        error = max_relative_error(value, expected) if same_shape else float("inf")
        rows.append(Row(name, dtype, quantity, error, tolerances[reference.kind(quantity)]))
    return rows


def check_implementation(
    name: str, config: CapsNetConfig, dtype: str, batch_size: int = CHECK_BATCH_SIZE
) -> list[Row]:
    """Rows of errors of one implementation in one dtype against the float64 reference."""
    return compare(name, dtype, observe(name, config, dtype, batch_size), reference_observation(config, batch_size))


def validate_routing_algorithm(config: CapsNetConfig, batch_size: int = CHECK_BATCH_SIZE) -> None:
    """Whether ``config``'s routing algorithm can judge implementations, before any is compared; raises
    :class:`~harness.errors.UserError` (one line) where it cannot.  A routing gradient the algorithm gives no
    meaning (:attr:`~harness.routing_algorithms.RoutingAlgorithm.routing_gradients`; exit status 2).  A
    built-in algorithm is then accepted (its reference is torch-vectorised's own code, held to the definition by
    the tests).  A plugin's algorithm needs a ``reference`` (exit status 2 without one), and that reference,
    run by :data:`REFERENCE` in float32 and in float64 on the same inputs, must agree with itself within the
    float32 tolerances (:data:`harness.tolerances.TOLERANCES`), else it is rejected naming the quantity that
    disagrees most for its tolerance (exit status 1: it ran, and failed), as it is if it raises."""
    algorithm = routing_algorithms.of(config)
    who = f"routing algorithm {algorithm.name!r} ({algorithm.source})"
    if config.routing_gradient not in algorithm.routing_gradients:
        raise UserError(f"{who} computes the routing gradient {' and '.join(algorithm.routing_gradients)} only, "
                        f"not {config.routing_gradient!r}")
    if algorithm.builtin:
        return
    if algorithm.reference is None:
        raise UserError(f"{who} cannot be checked: it has no reference (RoutingAlgorithm.reference, the torch "
                        f"function of u_hat, its parameters and the config that {REFERENCE} computes it by)")
    try:
        rows = compare(REFERENCE, "float32", observe(REFERENCE, config, "float32", batch_size),
                       reference_observation(config, batch_size))
    except Exception as error:  # the plugin's reference, not the harness, failed: say so in one line
        raise UserError(f"{who} rejected: its reference failed in {REFERENCE}: {type(error).__name__}: {error}",
                        EXIT_FAILURE) from error
    failing = sorted((row for row in rows if not row.passed), key=lambda row: row.error / row.tolerance)
    if failing:
        worst = failing[-1]
        others = f" (and {len(failing) - 1} more)" if len(failing) > 1 else ""
        raise UserError(f"{who} rejected: reference disagrees with itself across dtypes: {worst.quantity} error "
                        f"{worst.error:.3e} > tolerance {worst.tolerance:.0e}{others} ({REFERENCE} float32 against "
                        "float64, the same inputs)", EXIT_FAILURE)


def max_error(name: str, config: CapsNetConfig, dtype: str, batch_size: int = CHECK_BATCH_SIZE) -> float:
    """The largest error of any quantity (what the asv suite tracks beside speed)."""
    return max(row.error for row in check_implementation(name, config, dtype, batch_size))


TIMED_STEPS = 5


def time_train_step(name: str, config: CapsNetConfig, dtype: str, batch_size: int, repeats: int = TIMED_STEPS) -> float:
    """Median seconds of one training step (forward + backward + Adam), after one warm-up step."""
    impl = registry.create(name, config, init_parameters(config, dtype=dtype), dtype)
    batch = impl.to_device(*synthetic_batch(config, batch_size))
    impl.train_step(batch)
    impl.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        impl.train_step(batch)
        impl.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def format_table(rows: list[Row]) -> str:
    header = (f"{'implementation':<24} {'dtype':<8} {'quantity':<{QUANTITY_WIDTH}} {'max rel error':>13} "
              f"{'tolerance':>10}  status")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.implementation:<24} {row.dtype:<8} {row.quantity:<{QUANTITY_WIDTH}} {row.error:>13.3e} "
            f"{row.tolerance:>10.0e}  {'ok' if row.passed else 'FAIL'}"
        )
    return "\n".join(lines)


def routing_case_line(config: CapsNetConfig) -> str:
    """The line that says what the routing case is and where routing alone is checked, for ``config``."""
    drawn = list(routing_parameter_shapes(config))
    with_drawn = (f" and {', '.join(drawn)} drawn N(initial, {ROUTING_PARAMETER_STD}^2)" if drawn else "")
    counts = [count for count in routing_iteration_counts(config) if count is not None]
    where = (f"routing alone at {', '.join(map(str, counts))} iterations" if counts else
             f"routing alone once ({config.routing_algorithm} does not iterate)")
    return (f"quantities named '{routing_case_name(config)}': the network and routing alone again with digit.weight "
            f"x{routing_scale(config)}{with_drawn}, where routing moves the couplings (the canonical parameters hardly "
            f"route); {where}")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=cli.prog("check"),
        description=f"Compare implementations with the float64 reference ({REFERENCE}) on the canonical "
        f"parameters: outputs, loss, every gradient, every parameter after {ADAM_STEPS} Adam steps, u_hat and "
        "routing alone.",
    )
    options.add_impl(parser, several=True, help="implementations to check", default_help="all")
    options.add_dtype(parser, several=True, help="dtype(s) to check (default: float32 and float64)")
    options.add_config(parser, default=CHECK_CONFIG, why=CHECK_CONFIG_WHY)
    options.add_device(parser, default="all", allow_all=True, help="only implementations on this device (default: all)")
    options.add_batch_size(parser, default=CHECK_BATCH_SIZE, help="images in the synthetic batch compared")
    options.add_routing_algorithm(parser, consequence="the reference computes the same algorithm (a plugin's is "
                                  "validated first); an implementation that does not compute it is skipped")
    options.add_routing_gradient(parser, consequence="the reference computes the same setting; an implementation "
                                 "that does not support it is skipped")
    parser.add_argument("--time", action="store_true",
                        help="also time one training step of each (default: off; on with --device cuda)")
    return parser


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = get_config(args.config).replace(routing_algorithm=args.routing_algorithm,
                                                 routing_gradient=args.routing_gradient)
    except ValueError as error:  # a routing gradient that has no meaning under the algorithm
        raise UserError(str(error)) from None
    dtypes = args.dtype or sorted(TOLERANCES)
    infos = [registry.get(name) for name in args.impl] if args.impl else registry.entries()
    reference = registry.get(REFERENCE).availability()
    if not reference:
        raise UserError(f"the reference {REFERENCE} cannot run here: {reference.reason}")
    validate_routing_algorithm(config, args.batch_size)
    if args.device != "all":
        infos = [info for info in infos if info.device == args.device]
    why = options.config_note(CHECK_CONFIG, CHECK_CONFIG_WHY)
    note = f" (the default, {why})" if args.config == CHECK_CONFIG else ""
    print(f"reference: {REFERENCE} {REFERENCE_DTYPE} on the CPU; config {args.config}{note}; batch {args.batch_size}; "
          f"{ADAM_STEPS} Adam steps; routing algorithm {config.routing_algorithm}; routing gradient "
          f"{config.routing_gradient}", flush=True)
    print(routing_case_line(config), flush=True)
    rows, skipped, timings, crashed = [], [], [], []
    for info in infos:
        status = info.availability()
        if status:
            status = info.computes(config)
        if not status:
            skipped.append((info.name, status.reason))
            continue
        for dtype in dtypes:
            try:
                rows.extend(check_implementation(info.name, config, dtype, args.batch_size))
                if args.time or args.device == "cuda":
                    timings.append((info.name, dtype, time_train_step(info.name, config, dtype, args.batch_size)))
            except Exception as error:  # one broken implementation must not hide the others' results
                crashed.append((f"{info.name} {dtype}", f"{type(error).__name__}: {error}"))
    if rows:
        print(format_table(rows))
    for name, dtype, seconds in timings:
        print(f"train step  {name + ' ' + dtype:<32} {seconds * 1e3:10.2f} ms  "
              f"(batch {args.batch_size}, median of {TIMED_STEPS})")
    for name, reason in skipped:
        print(f"skipped     {name:<32} {reason}")
    for name, reason in crashed:
        print(f"CRASHED     {name:<32} {reason}")
    failures = [row for row in rows if not row.passed]
    if not rows and not crashed:
        print("nothing was checked: no requested implementation is available here", file=sys.stderr)
        return 1
    if failures or crashed:
        print(f"FAILED: {len(failures)} of {len(rows)} quantities exceed their tolerance; "
              f"{len(crashed)} run(s) crashed", file=sys.stderr)
        return 1
    print(f"all {len(rows)} quantities within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
