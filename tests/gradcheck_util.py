"""Sampled central finite differences of the total loss, for any registered implementation (float64)."""

from __future__ import annotations

import numpy as np

from harness import registry
from harness.check import drawn_routing_parameters
from harness.data import synthetic_batch
from harness.params import init_parameters

STEP = 1e-6
FD_TOLERANCE = 1e-5  # relative to the largest gradient of the tensor
ROUNDING_ULPS = 4


def livelier_parameters(config, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical float64 parameters with W scaled up, so capsule lengths (and every gradient) are O(0.1-1)
    rather than the near-zero of the small initialisation, where finite differences drown in rounding; the
    routing algorithm's own parameters (self-attention's digit.bias, zero at the start) drawn as the check's
    routing case draws them (harness.check.drawn_routing_parameters), so that none is zero."""
    params = init_parameters(config, seed=seed, dtype=np.float64)
    params["digit.weight"] = params["digit.weight"] * 30.0
    return drawn_routing_parameters(config, params)


def loss_of(name, config, params, images, labels) -> float:
    impl = registry.create(name, config, params, "float64")
    return float(impl.to_numpy(impl.forward_loss(impl.to_device(images, labels))))


def sampled_entries(gradient: np.ndarray, count: int, rng) -> list[tuple]:
    """The entry with the largest gradient plus ``count`` random ones."""
    picks = [np.unravel_index(np.argmax(np.abs(gradient)), gradient.shape)]
    picks += [tuple(rng.integers(0, n) for n in gradient.shape) for _ in range(count)]
    return picks


def finite_difference_errors(name, config, per_tensor: int = 4, batch_size: int = 3, seed: int = 0,
                             tensors=None) -> dict:
    """For every parameter tensor (those named in ``tensors`` only, where given): max |fd - analytic| / max
    |analytic gradient of that tensor|."""
    params = livelier_parameters(config)
    images, labels = synthetic_batch(config, batch_size, seed=seed)
    impl = registry.create(name, config, params, "float64")
    impl.forward_loss(impl.to_device(images, labels))
    impl.backward()
    gradients = impl.gradients()
    rng = np.random.default_rng(seed)
    errors = {}
    for param_name, gradient in gradients.items():
        if tensors is not None and param_name not in tensors:
            continue
        worst = 0.0
        for index in sampled_entries(gradient, per_tensor, rng):
            shifted = {k: v.copy() for k, v in params.items()}
            shifted[param_name][index] += STEP
            up = loss_of(name, config, shifted, images, labels)
            shifted[param_name][index] -= 2 * STEP
            down = loss_of(name, config, shifted, images, labels)
            # the difference quotient of two losses rounded to float64 is itself uncertain by about
            # ROUNDING_ULPS ulps of the loss over the step: only a difference beyond that counts
            rounding = ROUNDING_ULPS * np.finfo(np.float64).eps * max(abs(up), abs(down)) / (2 * STEP)
            worst = max(worst, abs((up - down) / (2 * STEP) - gradient[index]) - rounding)
        errors[param_name] = worst / np.max(np.abs(gradient))
    return errors


def finite_difference_failures(errors: dict[str, float], tolerance: float = FD_TOLERANCE) -> str:
    """The tensors whose gradient disagrees with finite differences, one line each as `capsbench check`
    writes its failures (quantity, error, tolerance), worst first; "" when all agree."""
    failing = sorted(((error, name) for name, error in errors.items() if not error < tolerance), reverse=True)
    lines = [f"gradient of {name} against finite differences: relative error {error:.3e} > tolerance "
             f"{tolerance:.0e}  FAIL" for error, name in failing]
    if lines:
        lines.insert(0, f"{len(lines)} of {len(errors)} parameter gradients disagree with central finite differences "
                        "of the loss (float64; error relative to the tensor's largest gradient):")
    return "\n".join(lines)
