"""The analytic FLOP counts against a count made by hand on a tiny network, and the paper's totals."""

import pytest

from harness.measure.flops import adam_flops, backward_flops, forward_flops, layers, phase_flops, step_layer_flops
from harness.measure.peak import backend_of, gemm_peak_gflops
from harness.params import count_parameters
from harness.spec import PAPER, CapsNetConfig

# 10x10 image; Conv1 2 channels 3x3 -> 8x8; PrimaryCaps 2 types x 2D, 3x3 stride 2 -> 3x3 (18 capsules);
# 3 classes x 4D; decoder 12 -> 5 -> 100; 2 routing iterations.
TINY = CapsNetConfig(image_size=10, conv1_channels=2, conv1_kernel=3, primary_caps_channels=2, primary_caps_dim=2,
                     primary_kernel=3, num_classes=3, digit_caps_dim=4, decoder_hidden=(5,), routing_iterations=2)

HAND_FORWARD = {
    "conv1": 2 * (8 * 8 * 2) * 9 + 128,  # 128 outputs, 9 multiply-adds each, plus bias = 2432
    "primary_caps": 2 * (3 * 3 * 4) * 18 + 36,  # 36 outputs, 3*3*2 = 18 multiply-adds each, plus bias = 1332
    "primary_squash": 18 * (3 * 2 + 4),  # 180
    "u_hat": 2 * 18 * 3 * 4 * 2,  # 864
    # iteration 1: c = 1/3 (no softmax), s 2*18*3*4 = 432, squash 3 * (3*4 + 4) = 48, agreement 432 + b 18*3 = 54
    "routing_iteration_1": 432 + 48 + 432 + 54,  # 966
    # iteration 2 (the last): softmax 18 * (4*3 - 1) = 198, s 432, squash 48, no agreement
    "routing_iteration_2": 198 + 432 + 48,  # 678
    "lengths_mask": 3 * 2 * 4 + 12,  # lengths 24, mask 3 x 4 = 12
    "decoder": (2 * 12 * 5 + 5) + (2 * 5 * 100 + 100) + 4 * 100,  # 1625 (layers, sigmoid)
    "losses": 8 * 3 + 3 * 100,  # 324
}
HAND_BACKWARD = {
    "conv1": 2304 + 128,  # weight gradient only (the image needs none), plus bias gradient
    "primary_caps": 2 * 1296 + 36,  # weight and input gradients, plus bias gradient
    "primary_squash": 360,
    "u_hat": 2 * 864,
    # iteration 2: s's two operands 2 x 432, squash 2 x 48, softmax 2 x 198
    "routing_iteration_2": 864 + 96 + 396,  # 1356
    # iteration 1: s 864, agreement 864, squash 96; no softmax (c = 1/J), no logit gradient to add (1 < r < 2: none)
    "routing_iteration_1": 864 + 864 + 96,  # 1824
    "lengths_mask": 48 + 12,
    "decoder": 2 * (2 * 12 * 5 + 2 * 5 * 100) + (5 + 100) + 2 * 4 * 100,  # 3145
    "losses": 648,
}


def test_forward_against_a_hand_count():
    assert forward_flops(TINY) == HAND_FORWARD
    assert sum(HAND_FORWARD.values()) == 8437


def test_backward_against_a_hand_count():
    assert backward_flops(TINY) == HAND_BACKWARD
    assert sum(HAND_BACKWARD.values()) == 14181


def test_three_iterations_add_one_logit_gradient_and_count_two_softmaxes():
    """With R = 3 the middle iteration both has a softmax and receives the next iteration's logit gradient
    (18 x 3 adds); the first has no softmax."""
    three = TINY.replace(routing_iterations=3)
    forward, backward = forward_flops(three), backward_flops(three)
    assert [forward[f"routing_iteration_{r}"] for r in (1, 2, 3)] == [966, 198 + 966, 678]
    assert [backward[f"routing_iteration_{r}"] for r in (1, 2, 3)] == [1824, 1824 + 396 + 54, 1356]


def test_the_step_table_adds_up_to_the_phases():
    table = step_layer_flops(TINY, batch_size=4)
    assert table[("update", "optimizer")] == 12 * 1193
    phases = phase_flops(TINY, batch_size=4)
    assert sum(table.values()) == phases["train_step"]
    assert sum(v for (phase, _), v in table.items() if phase == "backward") == phases["backward"]
    assert [layer for phase, layer in table if phase == "forward"] == layers(TINY)


def test_adam_and_phases():
    assert count_parameters(TINY) == 20 + 76 + 432 + 665
    assert adam_flops(TINY) == 12 * 1193
    phases = phase_flops(TINY, batch_size=4)
    assert phases["forward"] == 4 * 8437
    assert phases["train_step"] == 4 * (8437 + 14181) + 12 * 1193
    assert phases["inference"] == 4 * (8437 - 324)
    assert phases["routing"] == 4 * (966 + 678)
    assert phases["routing_backward"] == 4 * (966 + 678 + 1824 + 1356)


def test_paper_network_totals():
    forward = forward_flops(PAPER)
    assert forward["primary_caps"] == 382_215_168
    assert sum(forward.values()) == pytest.approx(406.6e6, rel=1e-3)
    per_image_step = phase_flops(PAPER, 1000)["train_step"] / 1000
    assert per_image_step == pytest.approx(1.204e9, rel=1e-3)
    assert forward["primary_caps"] / sum(forward.values()) > 0.93


def test_gemm_peak_is_2n_cubed_over_the_best_time(monkeypatch):
    """A GEMM of n^3 multiply-adds is 2 n^3 FLOPs; with the best of the timed products at 0.5 s, 256^3 gives
    2 x 256^3 / 0.5 / 1e9 GFLOP/s."""
    from harness.measure import peak

    monkeypatch.setattr(peak, "_best_seconds", lambda run, synchronize, repeats: 0.5)
    assert peak.gemm_peak_gflops("numpy", size=256) == 2 * 256**3 / 0.5 / 1e9


def test_gemm_peak_is_measured_and_backends_are_named():
    assert gemm_peak_gflops("numpy", size=256, repeats=1) > 0
    assert backend_of("torch", "cuda") == "torch-cuda" and backend_of("numpy", "cpu") == "numpy"
    with pytest.raises(ValueError, match="unknown GEMM backend 'jax'"):
        gemm_peak_gflops("jax")


def test_activation_memory_hand_count():
    from harness.measure.expected_memory import (
        expected_step_bytes,
        im2col_bytes,
        kept_activations,
        parameter_state_bytes,
    )

    kept = kept_activations(TINY, batch_size=2, itemsize=4)
    # per image: images 100, conv1 8*8*2 = 128, capsules 2*18*2 = 72, u_hat 18*3*4 = 216,
    # routing 2 * (18*3 + 2*3*4) = 156, lengths 3, decoder 12 + 5 + 100 = 117
    assert kept == {"images": 800, "conv1_output": 1024, "primary_capsules": 576, "u_hat": 1728,
                    "routing": 1248, "lengths": 24, "decoder": 936}
    assert parameter_state_bytes(TINY, itemsize=4) == 4 * 1193 * 4
    assert expected_step_bytes(TINY, 2) == 4 * 1193 * 4 + sum(kept.values())
    assert im2col_bytes(TINY, 1, itemsize=1) == 8 * 8 * 9 * 1 + 3 * 3 * 9 * 2


CPUINFO = """processor\t: {n}
vendor_id\t: {vendor}
cpu family\t: {family}
model name\t: {model}
cpu MHz\t\t: 2300.000
physical id\t: 0
core id\t\t: {n}
flags\t\t: fpu sse sse2 avx avx2 fma {extra}
"""


def cpuinfo(cores: int, vendor="GenuineIntel", family=6, model="Intel(R) Xeon(R) Platinum 8375C", extra="avx512f"):
    return "\n".join(CPUINFO.format(n=n, vendor=vendor, family=family, model=model, extra=extra) for n in range(cores))


def test_hardware_peak_is_cores_lanes_fma_units_two_and_the_clock():
    from harness.measure.peak import hardware_peak

    intel = hardware_peak(cpuinfo(2))  # 2 cores x 16 lanes x 2 FMA units x 2 x 2.3 GHz
    assert intel["gflops"] == pytest.approx(2 * 16 * 2 * 2 * 2.3) and intel["clock_source"].startswith("/proc")
    assert hardware_peak(cpuinfo(2), max_mhz=3500)["gflops"] == pytest.approx(2 * 16 * 2 * 2 * 3.5)
    zen4 = hardware_peak(cpuinfo(4, "AuthenticAMD", 25, "AMD EPYC 9R14", "avx512f avx512_bf16"))
    assert zen4["fma_units"] == 1 and "2 x 256-bit" in zen4["note"]
    assert zen4["gflops"] == pytest.approx(4 * 16 * 1 * 2 * 2.3)
    avx2 = hardware_peak(cpuinfo(8, model="Intel(R) Core(TM) i7-4770", extra=""))
    assert avx2["lanes"] == 8 and avx2["gflops"] == pytest.approx(8 * 8 * 2 * 2 * 2.3)
    no_fma = hardware_peak(cpuinfo(2).replace(" fma ", " "))
    assert no_fma["gflops"] is None and "FMA units" in no_fma["note"]
    no_clock = hardware_peak(cpuinfo(2).replace("cpu MHz\t\t: 2300.000\n", ""))
    assert no_clock["gflops"] is None and "clock" in no_clock["note"]


def test_the_peak_sentence_names_the_hardware_peak_or_the_best_gemm():
    from harness.measure.peak import hardware_peak, peak_sentence

    sentence = peak_sentence(hardware_peak(cpuinfo(2)), {"numpy": 209.0, "torch": 181.0})
    assert "294 GFLOP/s = 2 cores x 16 lanes x 2 FMA units x 2 x 2.30 GHz" in sentence
    assert sentence.index("209 GFLOP/s through numpy") < sentence.index("181 GFLOP/s through torch")
    older = peak_sentence(None, {"numpy": 209.0, "torch": 181.0})
    assert "best GEMM measured in the run (209 GFLOP/s" in older and "unknown" in older
    assert "n/a" in peak_sentence(None, {})


def test_conv1_counts_every_input_channel():
    """A 3-channel image triples Conv1's multiply-adds (MNIST's single channel hides a division by it)."""
    colour = forward_flops(TINY.replace(image_channels=3))
    assert colour["conv1"] == 2 * (8 * 8 * 2) * 9 * 3 + 128  # 6912 + 128
    assert backward_flops(TINY.replace(image_channels=3))["conv1"] == 6912 + 128


# Self-attention routing ------------------------------------------------------------------------------------

ATTENTION = TINY.replace(routing_algorithm="self-attention")  # N = 18, J = 3, D = 4: N*J = 54, N*J*D = 216
HAND_ATTENTION = {  # (forward, backward) per image
    # forward: sum over k 216, agreements 2*216 = 432, scaling 54, softmax 18*(4*3 - 1) = 198, bias 54
    # backward: the sum's gradient to every u_hat 216, both operands of the agreements 2*432, scaling 54,
    # softmax 2*198, bias gradient 54
    "attention": (216 + 432 + 54 + 198 + 54, 216 + 864 + 54 + 396 + 54),  # (954, 1584)
    # forward: s 2*216 = 432, squash 3 * (3*4 + 5) = 51; backward: both operands of s 864, squash 2*51
    "attention_sum": (432 + 51, 864 + 102),  # (483, 966)
}


def test_self_attention_layers_against_a_hand_count():
    from harness.measure.flops import routing_layers

    assert routing_layers(ATTENTION) == ["attention", "attention_sum"]
    assert layers(ATTENTION) == ["conv1", "primary_caps", "primary_squash", "u_hat", "attention", "attention_sum",
                                 "lengths_mask", "decoder", "losses"]
    forward, backward = forward_flops(ATTENTION), backward_flops(ATTENTION)
    assert {name: (forward[name], backward[name]) for name in HAND_ATTENTION} == HAND_ATTENTION
    assert HAND_ATTENTION["attention"] == (954, 1584) and HAND_ATTENTION["attention_sum"] == (483, 966)
    for layer in ("conv1", "primary_caps", "u_hat", "decoder", "losses"):  # the rest of the network as dynamic's
        assert (forward[layer], backward[layer]) == (HAND_FORWARD[layer], HAND_BACKWARD[layer])
    phases = phase_flops(ATTENTION, batch_size=2)
    assert phases["routing"] == 2 * (954 + 483)
    assert phases["routing_backward"] == 2 * (954 + 483 + 1584 + 966)
    assert adam_flops(ATTENTION) == 12 * (1193 + 3 * 18)  # digit.bias: one more parameter per (j, i)
    assert routing_layers(TINY.replace(routing_iterations=5)) == [f"routing_iteration_{r}" for r in range(1, 6)]


class Counted:
    """A number that counts the arithmetic done with it (one per +, -, *, /, negation; comparisons free)."""

    operations = 0

    def __init__(self, value):
        self.value = float(value.value if isinstance(value, Counted) else value)

    def _apply(self, other, function):
        Counted.operations += 1
        return Counted(function(self.value, other.value if isinstance(other, Counted) else other))

    def __add__(self, other):
        return self._apply(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._apply(other, lambda a, b: a - b)

    def __rsub__(self, other):
        return self._apply(other, lambda a, b: b - a)

    def __mul__(self, other):
        return self._apply(other, lambda a, b: a * b)

    def __truediv__(self, other):
        return self._apply(other, lambda a, b: a / b)

    def __neg__(self):
        return self._apply(0.0, lambda a, _: -a)

    def __lt__(self, other):
        return self.value < other.value


def counted(function, value: Counted) -> Counted:
    Counted.operations += 1
    return Counted(function(value.value))


def test_self_attention_forward_flops_are_the_operations_of_a_scalar_transcription():
    """harness.spec's self-attention transcribed on scalars that count their operations (sums started from
    zero, as a multiply-add counts 2), checked against torch's routing on the same numbers: the operations
    of each layer are the layer's forward FLOPs."""
    import math

    import numpy as np
    import torch

    from implementations.torch.routing import self_attention_vectorised

    config = ATTENTION
    n_in, n_out, dim = config.num_primary_caps, config.num_classes, config.digit_caps_dim
    rng = np.random.default_rng(0)
    u_hat, bias = rng.normal(size=(n_in, n_out, dim)), rng.normal(size=(n_out, n_in))
    u = [[[Counted(u_hat[i, j, d]) for d in range(dim)] for j in range(n_out)] for i in range(n_in)]
    b = [[Counted(bias[j, i]) for i in range(n_in)] for j in range(n_out)]
    Counted.operations = 0
    total = [[Counted(0.0) for _ in range(dim)] for _ in range(n_out)]
    for j in range(n_out):
        for k in range(n_in):
            for d in range(dim):
                total[j][d] = total[j][d] + u[k][j][d]
    coupling = [[None] * n_out for _ in range(n_in)]
    for i in range(n_in):
        logits = []
        for j in range(n_out):
            a = Counted(0.0)
            for d in range(dim):
                a = a + u[i][j][d] * total[j][d]
            logits.append(a * (1.0 / math.sqrt(dim)))
        largest = max(logits)
        exps = [counted(math.exp, a - largest) for a in logits]
        denominator = exps[0]
        for e in exps[1:]:
            denominator = denominator + e
        for j in range(n_out):
            coupling[i][j] = exps[j] / denominator + b[j][i]
    attention = Counted.operations
    Counted.operations = 0
    v = []
    for j in range(n_out):
        s = [Counted(0.0) for _ in range(dim)]
        for i in range(n_in):
            for d in range(dim):
                s[d] = s[d] + coupling[i][j] * u[i][j][d]
        squared = s[0] * s[0]
        for d in range(1, dim):
            squared = squared + s[d] * s[d]
        norm = counted(math.sqrt, squared + config.squash_eps)
        factor = (1.0 - counted(math.exp, -norm)) / norm
        v.append([s[d] * factor for d in range(dim)])
    attention_sum = Counted.operations
    reference = self_attention_vectorised(torch.tensor(u_hat[None]), torch.tensor(bias), config.squash_eps)[0]
    np.testing.assert_allclose([[x.value for x in row] for row in v], reference.numpy(), rtol=1e-12)
    forward = forward_flops(config)
    assert (attention, attention_sum) == (forward["attention"], forward["attention_sum"])


def test_self_attention_routing_is_about_half_of_three_dynamic_iterations_on_the_paper_network():
    """The arithmetic behind issue 44's target, per image: self-attention's routing forward + backward against
    dynamic routing's with 3 iterations, both from the counts above.  By hand (N = 1152, J = 10, D = 16:
    N*J = 11,520, N*J*D = 184,320): attention 620,928 + 1,034,496, attention_sum 369,170 + 738,340."""
    attention = phase_flops(PAPER.replace(routing_algorithm="self-attention"), 1)["routing_backward"]
    dynamic = phase_flops(PAPER, 1)["routing_backward"]
    assert (attention, dynamic) == (620_928 + 1_034_496 + 369_170 + 738_340, 5_838_408)
    assert 0.47 < attention / dynamic < 0.48


def test_an_algorithm_without_a_count_is_one_routing_layer_of_unknown_flops():
    import math

    plugin = TINY.replace(routing_algorithm="a-plugin-s")
    assert layers(plugin)[4] == "routing" and len(layers(plugin)) == len(layers(TINY)) - 1
    assert math.isnan(forward_flops(plugin)["routing"]) and math.isnan(backward_flops(plugin)["routing"])
    assert forward_flops(plugin)["conv1"] == HAND_FORWARD["conv1"]


def test_self_attention_activation_memory_hand_count():
    from harness.measure.expected_memory import kept_activations

    kept = kept_activations(ATTENTION, batch_size=2, itemsize=4)
    # per image: c 18*3 = 54, the sum over k 3*4 = 12, s 12, v 12: 90 values (dynamic's 2 iterations: 156)
    assert kept["routing"] == 90 * 2 * 4
    assert {name: value for name, value in kept.items() if name != "routing"} == {
        "images": 800, "conv1_output": 1024, "primary_capsules": 576, "u_hat": 1728, "lengths": 24, "decoder": 936}
