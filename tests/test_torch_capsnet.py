"""The PyTorch implementation's pieces against hand-computed cases and an independent per-example
transcription of Procedure 1.  The whole model is held to the contract in test_contract.py."""

import math

import numpy as np
import pytest
import torch

from harness import registry
from harness.data import synthetic_batch
from harness.params import init_parameters
from harness.spec import SMALL
from implementations.torch import autograd as tc
from implementations.torch import routing as tr


def paper_routing(u_hat: np.ndarray, iterations: int, eps: float) -> np.ndarray:
    """Procedure 1 for one example at a time, written from the paper with plain Python loops."""
    batch, n_in, n_out, dim = u_hat.shape
    out = np.zeros((batch, n_out, dim))
    for b in range(batch):
        logits = np.zeros((n_in, n_out))
        for _ in range(iterations):
            for i in range(n_in):
                e = np.exp(logits[i] - logits[i].max())
                c_i = e / e.sum()
                if i == 0:
                    coupling = np.zeros((n_in, n_out))
                coupling[i] = c_i
            for j in range(n_out):
                s = sum(coupling[i, j] * u_hat[b, i, j] for i in range(n_in))
                n2 = s @ s
                out[b, j] = n2 / (1 + n2) * s / np.sqrt(n2 + eps)
            for i in range(n_in):
                for j in range(n_out):
                    logits[i, j] += u_hat[b, i, j] @ out[b, j]
    return out


def test_squash_hand_computed():
    s = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    v = tr.squash(s, eps=1e-8)
    # |s|^2 = 25: 25 / 26 * s / 5
    np.testing.assert_allclose(v[0].numpy(), [25 / 26 * 3 / 5, 25 / 26 * 4 / 5], rtol=1e-7)
    np.testing.assert_array_equal(v[1].numpy(), [0.0, 0.0])


def test_squash_gradient_is_zero_at_zero():
    s = torch.zeros(1, 8, dtype=torch.float64, requires_grad=True)
    tr.squash(s, eps=1e-8).sum().backward()
    assert torch.equal(s.grad, torch.zeros(1, 8, dtype=torch.float64))


def test_squash_is_vector_valued_finite_differences():
    s = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: tr.squash(x, 1e-8), (s,))


def test_primary_capsules_take_the_channels_of_one_type_at_one_pixel():
    config = SMALL
    types, dim, size = config.primary_caps_channels, config.primary_caps_dim, config.primary_size
    # value encodes (type, component, h, w)
    t, d, h, w = np.meshgrid(np.arange(types), np.arange(dim), np.arange(size), np.arange(size), indexing="ij")
    code = t * 1000 + d * 100 + h * 10 + w
    conv_out = torch.tensor(code.reshape(1, types * dim, size, size), dtype=torch.float64)
    caps = tc.primary_capsules(conv_out, config).numpy()[0]
    assert caps.shape == (config.num_primary_caps, dim)
    for i in [0, 1, size, size * size, config.num_primary_caps - 1]:
        t_i, rest = divmod(i, size * size)
        h_i, w_i = divmod(rest, size)
        np.testing.assert_array_equal(caps[i], [t_i * 1000 + d_i * 100 + h_i * 10 + w_i for d_i in range(dim)])


def test_prediction_vectors_equal_the_tiled_product(rng):
    u = rng.normal(size=(3, 5, 4))
    w = rng.normal(size=(5, 2, 6, 4))
    expected = np.einsum("njdk,bnk->bnjd", w, u)
    got = tc.prediction_vectors(torch.tensor(u), torch.tensor(w)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


DYNAMIC_ROUTING = {"vectorised": tr.routing_vectorised, "looped": tr.routing_looped}


@pytest.mark.parametrize("routing", ["vectorised", "looped"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_routing_matches_the_paper_transcription(rng, routing, iterations):
    u_hat = rng.normal(scale=0.5, size=(2, 7, 3, 4))
    expected = paper_routing(u_hat, iterations, 1e-8)
    got = DYNAMIC_ROUTING[routing](torch.tensor(u_hat), iterations, 1e-8).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def scalar_squash(x: float, eps: float = 1e-8) -> float:
    return x * x / (1 + x * x) * x / math.sqrt(x * x + eps)


def test_coupling_is_a_softmax_over_output_capsules():
    """Three inputs, two outputs, one-dimensional capsules, 2 iterations, by hand: inputs 0 and 1 predict
    output 0 (2 and 1), input 2 predicts output 1 (1).  Iteration 1: c = 1/2, s = (1.5, 0.5).  The logits
    become b_00 = 2 v_0, b_10 = v_0, b_21 = v_1; iteration 2 normalises each input's logits over the two
    outputs.  Normalising over the inputs instead (the common bug) gives another answer, checked too."""
    u_hat = torch.zeros(1, 3, 2, 1, dtype=torch.float64)
    u_hat[0, 0, 0, 0], u_hat[0, 1, 0, 0], u_hat[0, 2, 1, 0] = 2.0, 1.0, 1.0
    v0, v1 = scalar_squash(1.5), scalar_squash(0.5)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # softmax over two outputs, one of logit 0
    s0 = 2 * sigmoid(2 * v0) + 1 * sigmoid(v0)
    s1 = 1 * sigmoid(v1)
    expected = np.array([[scalar_squash(s0)], [scalar_squash(s1)]])
    config = SMALL.replace(routing_iterations=2)
    for key, routing in tr.ROUTING.items():
        if key[0] == "dynamic":
            np.testing.assert_allclose(routing.autograd(u_hat, {}, config)[0].numpy(), expected, rtol=1e-12)
    over_inputs = 2 * math.exp(2 * v0) / (math.exp(2 * v0) + math.exp(v0) + 1) + math.exp(v0) / (
        math.exp(2 * v0) + math.exp(v0) + 1)
    assert abs(scalar_squash(over_inputs) - expected[0, 0]) > 1e-3


@pytest.mark.parametrize("routing", ["vectorised", "looped"])
def test_routing_gradcheck(rng, routing):
    u_hat = torch.tensor(rng.normal(size=(2, 4, 3, 2)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: DYNAMIC_ROUTING[routing](x, 3, 1e-8), (u_hat,))


def test_routing_gradients_flow_through_every_iteration(rng):
    u_hat = torch.tensor(rng.normal(size=(1, 4, 3, 2)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: tr.routing_vectorised(x, 3, 1e-8), (u_hat,))
    # with three iterations the gradient differs from the one-iteration gradient (routing is not detached)
    g3 = torch.autograd.grad(tr.routing_vectorised(u_hat, 3, 1e-8).sum(), u_hat)[0]
    g1 = torch.autograd.grad(tr.routing_vectorised(u_hat, 1, 1e-8).sum(), u_hat)[0]
    assert not torch.allclose(g3, g1)


def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.95, 0.2, 0.05], [0.5, 0.0, 0.12]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    config = SMALL.replace(num_classes=3)
    # example 0: present 0 (0.95 > 0.9); absent 0.5*(0.1^2) for 0.2, 0 for 0.05 -> 0.005
    # example 1: present (0.9-0.12)^2 = 0.6084; absent 0.5*0.4^2 = 0.08 for 0.5 -> 0.6884
    expected = (0.005 + 0.6884) / 2
    assert tc.margin_loss(lengths, labels, config).item() == pytest.approx(expected, rel=1e-12)


def test_reconstruction_loss_hand_computed():
    images = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    recon = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0]], dtype=torch.float64)
    # sum of squares: 1 and 0.5 -> mean 0.75 -> x 0.0005
    assert tc.reconstruction_loss(recon, images, SMALL).item() == pytest.approx(0.75 * 0.0005)


def test_decoder_sees_the_true_class_in_training_and_the_longest_at_inference():
    params = init_parameters(SMALL, dtype=np.float64)
    impl = registry.create("torch-vectorised", SMALL, params, "float64")
    images, labels = synthetic_batch(SMALL, 6)
    batch = impl.to_device(images, labels)
    v = impl.routing_forward(impl.prediction_vectors(batch))
    lengths = torch.linalg.vector_norm(v, dim=-1)
    longest = lengths.argmax(dim=1)
    assert (longest != batch.labels).any(), "the test needs examples whose label is not the longest capsule"
    tensors = {name: torch.tensor(value) for name, value in params.items()}
    # the masked input keeps exactly one capsule: decoding a v with every other capsule zeroed is the same
    only_label = v * torch.nn.functional.one_hot(batch.labels, SMALL.num_classes).unsqueeze(-1)
    np.testing.assert_allclose(impl.forward(batch, train=True)[1], tc.decode(tensors, only_label, batch.labels, SMALL))
    np.testing.assert_allclose(impl.forward(batch, train=False)[1], tc.decode(tensors, v, longest, SMALL))
    assert not torch.equal(impl.forward(batch, train=True)[1], impl.forward(batch, train=False)[1])


# Self-attention routing (harness.spec) ----------------------------------------------------------------------

SELF_ATTENTION = {"vectorised": tr.self_attention_vectorised, "looped": tr.self_attention_looped}
# Two inputs i, two outputs j, capsules along the first component: U[i][j] = u_hat_j|i, BIAS[j][i] = b_ji
U = [[1.0, -1.0], [2.0, 0.5]]
BIAS = [[0.1, -0.2], [0.3, 0.05]]


def attention_squash_scalar(s: float, eps: float = 1e-8) -> float:
    n = math.sqrt(s * s + eps)
    return (1.0 - math.exp(-n)) * s / n


def one_component_case(dim: int):
    """u_hat (1, 2, 2, dim) holding U in component 0 and zeros elsewhere, the bias BIAS."""
    u_hat = torch.zeros(1, 2, 2, dim, dtype=torch.float64)
    u_hat[0, :, :, 0] = torch.tensor(U, dtype=torch.float64)
    return u_hat, torch.tensor(BIAS, dtype=torch.float64)


@pytest.mark.parametrize("variant", ["vectorised", "looped"])
@pytest.mark.parametrize("dim", [1, 4])
def test_self_attention_hand_computed(variant, dim):
    """By hand: T_0 = 1 + 2 = 3, T_1 = -1 + 0.5 = -0.5; a_ij = u_hat_j|i T_j / sqrt(D): a_00 = 3, a_01 = 0.5,
    a_10 = 6, a_11 = -0.25 (over sqrt(D)); input i's softmax over the two outputs is a sigmoid of
    a_i0 - a_i1; c_ij = that + b_ji; s_j = sum_i c_ij u_hat_j|i; v_j = (1 - exp(-|s_j|)) s_j / |s_j|.  With
    D = 4 the capsules live in the first component (the others zero), so the scale 1 / sqrt(D) is 1/2."""
    root = math.sqrt(dim)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    p0 = sigmoid((3.0 - 0.5) / root)  # input 0: softmax over outputs (a_00, a_01), output 0's share
    p1 = sigmoid((6.0 - -0.25) / root)  # input 1: (a_10, a_11)
    c = [[p0 + 0.1, (1 - p0) + 0.3], [p1 - 0.2, (1 - p1) + 0.05]]  # c[i][j] = softmax + b_ji (BIAS[j][i])
    s0 = c[0][0] * 1.0 + c[1][0] * 2.0
    s1 = c[0][1] * -1.0 + c[1][1] * 0.5
    expected = np.zeros((2, dim))
    expected[:, 0] = [attention_squash_scalar(s0), attention_squash_scalar(s1)]
    u_hat, bias = one_component_case(dim)
    np.testing.assert_allclose(SELF_ATTENTION[variant](u_hat, bias, 1e-8)[0].numpy(), expected, rtol=1e-12,
                               atol=1e-15)


def test_self_attention_softmax_is_over_the_outputs_and_the_bias_comes_after_it():
    """The hand case again against two plausible misreadings, each computed by hand from the same agreements:
    the softmax over the inputs i (for each output j, as in transformer attention), and the bias added to the
    agreements before the softmax.  Both give other outputs, so the hand case tells them apart."""
    a = np.array([[3.0, 0.5], [6.0, -0.25]])  # a[i][j], D = 1
    u = np.array(U)
    bias = np.array(BIAS).T  # b_ji as [i][j]

    def outputs(c):
        return [attention_squash_scalar(float((c[:, j] * u[:, j]).sum())) for j in range(2)]

    def softmax(x, axis):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    right = outputs(softmax(a, axis=1) + bias)
    over_inputs = outputs(softmax(a, axis=0) + bias)
    bias_first = outputs(softmax(a + bias, axis=1))
    for routing in SELF_ATTENTION.values():
        np.testing.assert_allclose(routing(*one_component_case(1), 1e-8)[0, :, 0].numpy(), right, rtol=1e-12)
    assert np.abs(np.subtract(over_inputs, right)).max() > 1e-2
    assert np.abs(np.subtract(bias_first, right)).max() > 1e-2


@pytest.mark.parametrize("variant", ["vectorised", "looped"])
def test_self_attention_gradcheck(rng, variant):
    """Gradients of u_hat and of the bias flow through a, c and the sum (float64 finite differences)."""
    u_hat = torch.tensor(rng.normal(size=(2, 4, 3, 2)), requires_grad=True)  # (B, N, J, D)
    bias = torch.tensor(rng.normal(scale=0.5, size=(3, 4)), requires_grad=True)  # (J, N)
    assert torch.autograd.gradcheck(lambda x, b: SELF_ATTENTION[variant](x, b, 1e-8), (u_hat, bias))


def test_self_attention_bias_gradient_of_the_whole_loss_finite_differences():
    """torch-vectorised's d loss / d digit.bias (float64, the whole network, a non-zero bias) against central
    differences of its loss at a few entries: the largest and three drawn at random."""
    from gradcheck_util import STEP, livelier_parameters, loss_of, sampled_entries

    config = SMALL.replace(routing_algorithm="self-attention")
    params = livelier_parameters(config)
    params["digit.bias"] = np.random.default_rng(1).normal(scale=0.3, size=params["digit.bias"].shape)
    images, labels = synthetic_batch(config, 3)
    impl = registry.create("torch-vectorised", config, params, "float64")
    impl.forward_loss(impl.to_device(images, labels))
    impl.backward()
    gradient = impl.gradients()["digit.bias"]
    assert np.abs(gradient).max() > 1e-4
    for index in sampled_entries(gradient, 3, np.random.default_rng(0)):
        shifted = {name: value.copy() for name, value in params.items()}
        shifted["digit.bias"][index] += STEP
        up = loss_of("torch-vectorised", config, shifted, images, labels)
        shifted["digit.bias"][index] -= 2 * STEP
        down = loss_of("torch-vectorised", config, shifted, images, labels)
        assert (up - down) / (2 * STEP) == pytest.approx(gradient[index], abs=1e-7 * np.abs(gradient).max() + 1e-10)
