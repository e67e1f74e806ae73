"""The one definition of the CapsNet architecture that every implementation, test and benchmark uses.

Every size and constant of the network of Sabour, Frosst & Hinton (2017), "Dynamic Routing Between
Capsules", is a field of :class:`CapsNetConfig`; the defaults are the paper's MNIST network.  Shapes that
follow from the fields (20x20 after Conv1, 6x6 after PrimaryCaps, 1152 primary capsules, ...) are derived
properties, never written down a second time.

Choices the paper leaves open, fixed here once for every implementation:

* **PrimaryCaps layout.**  PrimaryCaps is one convolution with ``primary_caps_channels * primary_caps_dim``
  output channels.  Output channel ``o = t * primary_caps_dim + d`` is component ``d`` of capsule type
  ``t``.  Capsule ``i = t * H * W + h * W + w`` (type-major, then row, then column) is the 8D vector of the
  8 channels of type ``t`` at pixel ``(h, w)``.  In NCHW terms: reshape to ``(B, T, D, H, W)``, move ``D``
  last, flatten ``(T, H, W)``.  A plain ``view(B, -1, D)`` of the NCHW tensor (no transpose) mixes pixels
  into capsule components, a known bug in public implementations.
* **squash.**  ``squash(s) = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps)`` along the capsule axis;
  ``squash_eps`` keeps the value and gradient finite at ``s = 0``.
* **Routing (Procedure 1).**  Logits ``b`` are per example and start at zero on every forward pass;
  ``c = softmax(b)`` over the *output* capsules for each input capsule; ``routing_iterations`` counts the
  computations of ``v`` (the paper's r = 3).  The logit update after the last iteration cannot change the
  output and is skipped.  Gradients flow through every iteration, through ``c`` and ``b`` as well as
  through the weighted sum, exactly as Procedure 1 reads (no stop-gradient anywhere): the routing
  gradient ``full``, the default.
* **Routing gradient** (``routing_gradient``, one of :data:`ROUTING_GRADIENTS`).  The forward values are
  the same under both settings; only the gradient differs.  ``full``: as above.  ``final``: the gradient
  of u_hat is stopped in every iteration but the last.  With ``sg(x)`` the value of x with zero
  derivative, R iterations and b_1 = 0:

  - iteration r < R:  c_r = softmax_j(b_r),  s_r,j = sum_i c_r,ij sg(u_hat_j|i),  v_r,j = squash(s_r,j),
    b_r+1,ij = b_r,ij + sg(u_hat_j|i) . v_r,j; so b_r, c_r and v_r are constants and no gradient
    reaches u_hat through the agreements or the logits;
  - iteration R:  c_R = softmax_j(b_R) (a constant: b_R is made of stopped values),
    s_R,j = sum_i c_R,ij u_hat_j|i,  v_j = squash(s_R,j);

  hence d loss / d u_hat_j|i = c_R,ij * J_squash(s_R,j)^T d loss / d v_j: one rank-one term per example
  and output capsule, against 2R - 1 under ``full``.  For R = 1 the two settings are one function.
  This is what ``x_hat_detached`` does in XifengGuo's CapsNet-Pytorch (``capsulelayers.py``,
  ``DenseCapsule.forward``), and the two agree on: the logits start at 0 per example; the softmax runs
  over the output capsules (their ``dim=1`` of b laid out [batch, out, in]); the iterations before the
  last compute s, v and the logit update from the detached predictions, so their b (and hence c of the
  last iteration) carries no gradient; the last iteration alone uses the attached predictions in its
  weighted sum; the logit update after the last iteration is skipped.  They differ only where capsbench's
  squash differs (``squash_eps`` inside the root; theirs adds 1e-8 to the norm), not in where the gradient
  is stopped.
* **Routing algorithm** (``routing_algorithm``, one of :data:`ROUTING_ALGORITHMS`, or a plugin's, see
  :mod:`harness.routing_algorithms`).  Everything but the map from u_hat to v is the same under every
  algorithm: the same Conv1, PrimaryCaps (with the squash above), W_ij, lengths, decoder and losses.

  - ``dynamic``: Procedure 1 of Sabour et al. (2017), as above; iterative (``routing_iterations``), both
    routing gradients.
  - ``self-attention``: the routing of Mazzia, Salvetti & Chiaberge (2021), "Efficient-CapsNet: Capsule
    Network with Self-Attention Routing", as the authors' ``FCCaps`` layer computes it (EscVM/Efficient-CapsNet
    ``utils/layers.py``).  Per example, with u_hat_j|i the prediction of input capsule i for output capsule j
    and D = ``digit_caps_dim``, in one pass (no iterations, no logits carried over):

      a_ij = u_hat_j|i . (sum_k u_hat_j|k) / sqrt(D)        (the agreement of i with all of j's predictions)
      c_ij = softmax_j(a_ij) + b_ji                          (softmax over the *output* capsules j, then the bias)
      s_j  = sum_i c_ij u_hat_j|i
      v_j  = (1 - exp(-n_j)) s_j / n_j,  n_j = sqrt(|s_j|^2 + squash_eps)

    ``b`` is the parameter ``digit.bias`` (harness.params), shape (num_classes, num_primary_caps), zero at
    the start, a parameter of the network under this algorithm alone.  Gradients flow through a, c and the
    weighted sum.  ``routing_iterations`` does not apply (a config keeps its value, which nothing reads);
    the routing gradient ``final`` stops the gradient in the iterations *before* the last, and with one
    pass there are none, so ``final`` would be ``full`` under another name: :data:`ROUTING_ALGORITHM_GRADIENTS`
    gives self-attention ``full`` alone and a config asking for ``final`` is refused.
    Choices of the authors' code that the paper's text leaves open, all followed: the scale is sqrt of the
    *output* capsule size (their ``self.D``, 16), not the input's; the sum over k includes k = i; the
    softmax runs over the output capsules (their ``axis=1`` of c laid out [batch, j, i, 1]), not over the
    inputs as in transformer attention; the bias is added *after* the softmax, so c_ij need not sum to one
    over j nor stay positive; the bias is one per (j, i) pair, shared by the examples.  Their squash is
    ``(1 - 1 / (exp(|s|) + 1e-20)) * s / (|s| + 1e-20)`` with ``|s|`` the plain norm (whose gradient is
    undefined at s = 0); capsbench puts ``squash_eps`` inside the root, as in the dynamic squash, so the
    value and gradient are finite at s = 0 (the two differ by below float32 rounding where |s| > 1e-3).
    Where capsbench departs from the authors' network on purpose, to change the routing alone: their
    PrimaryCaps is a depthwise convolution squashed with their squash and their W starts He-normal;
    capsbench keeps the paper's Conv1, PrimaryCaps, squash of the primary capsules and W ~ N(0, 0.01^2),
    so the two algorithms differ in routing and in nothing else, and start from the same numbers.
* **Capsule length.**  ``|v| = sqrt(sum v^2)`` with gradient ``v / |v|``, taken as 0 where ``|v| = 0``
  (the convention of ``torch.linalg.vector_norm``).
* **Decoder mask.**  The DigitCaps output is masked to the true class in training and to the longest
  capsule at inference; no gradient flows through the choice of the longest capsule.
* **Loss.**  Margin loss on the raw lengths with squared hinges, summed over classes and averaged over the
  batch; reconstruction loss is the sum of squared pixel errors (pixels in [0, 1]) averaged over the batch
  and weighted by ``reconstruction_weight``.
* **Training recipe.**  Adam (lr 1e-3, torch's defaults otherwise) with the learning rate decayed
  exponentially, x 0.96 every 2,000 steps, smoothly (:data:`PAPER_SCHEDULE`), batch 128, random shifts of
  up to 2 pixels with zero fill (:data:`MAX_SHIFT_PIXELS`).

Where the official code (Sarasra/models ``research/capsules``: ``models/layers/layers.py``,
``models/capsule_model.py``, ``experiment.py``; ``models/model.py``, ``models/layers/variables.py`` and
``input_data/mnist/mnist_shift.py`` read from the same folder of tensorflow/models) differs from the paper's
text, and what capsbench follows:

* DigitCaps adds a bias (shape [10, 16], initialised to 0.1) to s_j before the squash in every routing
  iteration, and Conv1 and PrimaryCaps biases start at 0.1; the paper has no DigitCaps bias.  capsbench
  follows the paper: no DigitCaps bias (Conv1 and PrimaryCaps biases as PyTorch initialises them).
* The margin loss is ``0.5 * positive + 0.5 * 0.5 * negative`` (an extra factor 0.5 on both terms) and
  ``tf.reduce_mean`` averages it over the classes as well as the batch: 1/20 of the paper's sum over
  classes.  The reconstruction loss (sum over pixels, mean over the batch, x 0.0005) is the paper's, so
  its weight relative to the margin loss is 20 times the paper's.  capsbench follows the paper's text.
* squash has no epsilon (it divides by the raw norm); capsbench keeps ``squash_eps`` so that the value and
  the gradient are finite at s = 0 (the difference is below float32 rounding elsewhere).
* Every weight, W included, starts from a truncated normal with standard deviation 0.1 (Conv1's 0.05);
  capsbench draws W ~ N(0, 0.01^2) (``digit_weight_std``) and the other layers as PyTorch does.
* PrimaryCaps capsules also pass through one routing iteration over the 32 capsule types (zero logits,
  softmax over the types), which scales every primary capsule by 1/32 before its squash; capsbench squashes
  the convolution's output directly, as the paper describes.
* The learning rate is ``exponential_decay(1e-3, step, 2000, 0.96)`` without staircase, floored at 1e-6
  (a floor the decay does not reach in the official 300,000 steps); capsbench follows it.
* The training set is written once at all 25 shifts in [-2, 2]^2 (zero fill) and shuffled; capsbench
  draws one random shift per image per epoch from the same 25.
* Agreed with the paper and followed: routing logits start at 0 per example, the softmax runs over the
  output capsules, 3 iterations, no stop-gradient anywhere in routing (``full``, the default), m+ 0.9,
  m- 0.1, lambda 0.5, decoder 512-1024-784 with a sigmoid output, pixels in [0, 1], batch 128.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# How the gradient flows through routing (see the module docstring): through every iteration, or through
# the last iteration's weighted sum alone.
ROUTING_GRADIENTS = ("full", "final")
# The routing algorithms every built-in implementation computes (see the module docstring); a plugin can
# register more (harness.routing_algorithms).  "dynamic" is the paper's and the default.
ROUTING_ALGORITHMS = ("dynamic", "self-attention")
DEFAULT_ROUTING_ALGORITHM = "dynamic"
# The routing gradients that mean something under each built-in algorithm (self-attention has no iterations
# before its last, so "final" would be "full" under another name).
ROUTING_ALGORITHM_GRADIENTS = {"dynamic": ROUTING_GRADIENTS, "self-attention": ("full",)}


def conv_output_size(size: int, kernel: int, stride: int) -> int:
    """Height (or width) of the output of a 'valid' (unpadded) convolution of a ``size``-pixel input with a
    ``kernel``-pixel kernel at ``stride``; 0 or less where the kernel does not fit."""
    return (size - kernel) // stride + 1


@dataclass(frozen=True)
class CapsNetConfig:
    """Sizes and constants of one CapsNet; the defaults are the paper's MNIST network.  Each field is one
    size or constant the module docstring names; the properties derive the shapes from them.  Raises
    ValueError for a ``routing_gradient`` not in :data:`ROUTING_GRADIENTS` or without meaning under the
    ``routing_algorithm`` (:data:`ROUTING_ALGORITHM_GRADIENTS`), fewer than one routing iteration, or an image
    too small for the two convolutions.  An algorithm's name is checked where it is looked up
    (:func:`harness.routing_algorithms.get`: a plugin may bring names this module does not know)."""

    image_channels: int = 1
    image_size: int = 28
    conv1_channels: int = 256
    conv1_kernel: int = 9
    conv1_stride: int = 1
    primary_caps_channels: int = 32  # capsule types
    primary_caps_dim: int = 8
    primary_kernel: int = 9
    primary_stride: int = 2
    num_classes: int = 10
    digit_caps_dim: int = 16
    routing_iterations: int = 3
    squash_eps: float = 1e-8  # keeps squash and its gradient finite at s = 0
    decoder_hidden: tuple[int, ...] = (512, 1024)
    margin_positive: float = 0.9  # m+
    margin_negative: float = 0.1  # m-
    margin_down_weight: float = 0.5  # lambda
    reconstruction_weight: float = 0.0005
    digit_weight_std: float = 0.01  # W ~ N(0, std^2); the correct softmax axis needs a small W
    routing_gradient: str = "full"  # one of ROUTING_GRADIENTS; see the module docstring
    routing_algorithm: str = DEFAULT_ROUTING_ALGORITHM  # ROUTING_ALGORITHMS or a plugin's; see the docstring

    def __post_init__(self) -> None:
        if self.routing_gradient not in ROUTING_GRADIENTS:
            raise ValueError(f"routing_gradient must be one of {', '.join(ROUTING_GRADIENTS)}, "
                             f"got {self.routing_gradient!r}")
        if not isinstance(self.routing_algorithm, str) or not self.routing_algorithm:
            raise ValueError(f"routing_algorithm must be a name such as {ROUTING_ALGORITHMS[0]!r}, "
                             f"got {self.routing_algorithm!r}")
        meaningful = ROUTING_ALGORITHM_GRADIENTS.get(self.routing_algorithm, ROUTING_GRADIENTS)
        if self.routing_gradient not in meaningful:
            raise ValueError(f"routing_gradient {self.routing_gradient!r} has no meaning under the routing "
                             f"algorithm {self.routing_algorithm!r}, which has no iterations before its last; "
                             f"use {' or '.join(meaningful)}")
        if self.routing_iterations < 1:
            raise ValueError(f"routing_iterations must be >= 1, got {self.routing_iterations}")
        if self.primary_size < 1:
            raise ValueError(
                f"image_size {self.image_size} is too small for the Conv1 and PrimaryCaps kernels"
            )

    # Derived shapes ------------------------------------------------------------------------------
    @property
    def conv1_size(self) -> int:
        """Height (= width) of the Conv1 feature map (20 in the paper)."""
        return conv_output_size(self.image_size, self.conv1_kernel, self.conv1_stride)

    @property
    def primary_size(self) -> int:
        """Height (= width) of the PrimaryCaps grid (6 in the paper)."""
        return conv_output_size(self.conv1_size, self.primary_kernel, self.primary_stride)

    @property
    def primary_conv_channels(self) -> int:
        """Output channels of the single PrimaryCaps convolution (256 in the paper)."""
        return self.primary_caps_channels * self.primary_caps_dim

    @property
    def num_primary_caps(self) -> int:
        """Number of 8D input capsules to routing (1152 in the paper)."""
        return self.primary_size * self.primary_size * self.primary_caps_channels

    @property
    def image_pixels(self) -> int:
        """Pixels the decoder reconstructs (784 for MNIST)."""
        return self.image_channels * self.image_size * self.image_size

    @property
    def decoder_input(self) -> int:
        """Width of the masked DigitCaps output fed to the decoder (160 in the paper)."""
        return self.num_classes * self.digit_caps_dim

    @property
    def decoder_sizes(self) -> tuple[int, ...]:
        """Widths of every decoder layer, input to output: (160, 512, 1024, 784) in the paper."""
        return (self.decoder_input, *self.decoder_hidden, self.image_pixels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-example shape of the input images (C, H, W): (1, 28, 28) for MNIST."""
        return (self.image_channels, self.image_size, self.image_size)

    @property
    def u_hat_shape(self) -> tuple[int, int, int]:
        """Per-example shape of the prediction vectors u_hat in the canonical layout (N, J, D)."""
        return (self.num_primary_caps, self.num_classes, self.digit_caps_dim)

    def replace(self, **changes) -> CapsNetConfig:
        """A copy with the fields named in ``changes`` changed (e.g. ``routing_iterations=1``), checked as a new
        config is (ValueError); TypeError for a name that is not a field."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """Every field by name (what a results file records of the network)."""
        return dataclasses.asdict(self)


PAPER = CapsNetConfig()

# A network of the same structure, small enough for float64 gradient checks and CI training runs on MNIST.
SMALL = CapsNetConfig(
    conv1_channels=16,
    primary_caps_channels=4,
    primary_caps_dim=4,
    digit_caps_dim=8,
    decoder_hidden=(64, 128),
)

CONFIGS: dict[str, CapsNetConfig] = {"paper": PAPER, "small": SMALL}


def get_config(name: str) -> CapsNetConfig:
    """The configuration of :data:`CONFIGS` named ``name`` ('paper' or 'small').  Raises ValueError naming the
    known ones for another name."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}: choose one of {', '.join(CONFIGS)}") from None


@dataclass(frozen=True)
class AdamConfig:
    """The optimiser every implementation uses (torch.optim.Adam's update rule and defaults, lr 1e-3)."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


ADAM = AdamConfig()


@dataclass(frozen=True)
class LearningRateSchedule:
    """Adam's learning rate as a function of the step: ``initial * decay_rate ** (step / decay_steps)``,
    the step counted from 0 for the first update (TensorFlow's ``exponential_decay`` without staircase).
    ``decay_rate`` 1 is a constant rate.  Every implementation's optimizer asks this one function.  ``name``
    is what ``--schedule`` and results files call it.  Raises ValueError unless ``initial`` > 0,
    0 < ``decay_rate`` <= 1 and ``decay_steps`` >= 1."""

    name: str
    initial: float = ADAM.lr
    decay_rate: float = 1.0
    decay_steps: int = 1

    def __post_init__(self) -> None:
        if self.initial <= 0 or not 0 < self.decay_rate <= 1 or self.decay_steps < 1:
            raise ValueError(f"learning-rate schedule {self.name!r}: initial > 0, 0 < decay_rate <= 1 and "
                             f"decay_steps >= 1 are required, got {self.initial}, {self.decay_rate}, "
                             f"{self.decay_steps}")

    def factor(self, step: int) -> float:
        """The learning rate of update ``step`` (0 for the first) over the initial rate."""
        return self.decay_rate ** (step / self.decay_steps)

    def rate(self, step: int) -> float:
        """The learning rate of update ``step`` (0 for the first)."""
        return self.initial * self.factor(step)

    def as_dict(self) -> dict:
        """Every field by name (what a training results file records of the schedule)."""
        return dataclasses.asdict(self)


CONSTANT_RATE = LearningRateSchedule("constant")
# The official implementation's schedule (see the module docstring): x 0.96 every 2,000 steps, smoothly.
PAPER_SCHEDULE = LearningRateSchedule("paper", decay_rate=0.96, decay_steps=2000)
SCHEDULES: dict[str, LearningRateSchedule] = {schedule.name: schedule for schedule in (PAPER_SCHEDULE, CONSTANT_RATE)}

# Shift augmentation of the paper: up to this many pixels in each direction, zero padded.
MAX_SHIFT_PIXELS = 2
