"""The registry: names, metadata, availability reasons, errors, and a broken implementation caught."""

import pytest

from harness import registry
from harness.check import check_implementation
from harness.params import init_parameters
from harness.spec import SMALL
from implementations.torch.autograd import TorchCapsNet


def test_builtin_torch_implementations_are_registered_and_available():
    for name in ("torch-vectorised", "torch-looped"):
        info = registry.get(name)
        assert (info.framework, info.device) == ("torch", "cpu")
        assert info.availability()
    assert registry.get("torch-looped").routing_variant == "looped"
    assert {"torch-vectorised", "torch-looped"} <= set(registry.available("cpu"))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(registry.UnknownImplementationError) as error:
        registry.get("torch-vectorized")
    message = str(error.value)
    assert "unknown implementation 'torch-vectorized' (did you mean torch-vectorised?); known implementations: " \
        in message
    assert "torch-vectorised" in message and "torch-looped" in message
    assert "\n" not in message


def test_a_name_like_none_of_the_known_ones_suggests_nothing():
    with pytest.raises(registry.UnknownImplementationError) as error:
        registry.get("tensorflow")
    assert str(error.value).startswith("unknown implementation 'tensorflow'; known implementations: ")
    with pytest.raises(registry.UnknownImplementationError) as error:
        registry.get("torch-fusd")
    assert "(did you mean torch-fused?)" in str(error.value)


def test_cuda_implementation_without_a_gpu_says_why():
    info = registry.get("torch-vectorised-cuda")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    status = info.availability()
    assert not status and "no CUDA device" in status.reason
    with pytest.raises(registry.UnavailableImplementationError, match="unavailable here: no CUDA device"):
        info.create(SMALL, init_parameters(SMALL))


def test_a_name_cannot_be_registered_twice():
    class Other(TorchCapsNet):
        pass

    with pytest.raises(ValueError, match="already registered"):
        registry.register("torch-vectorised", Other)


def test_only_implementation_subclasses_register():
    with pytest.raises(TypeError, match="not a subclass"):
        registry.register("not-an-implementation", object)


def test_wrong_parameters_are_refused():
    params = init_parameters(SMALL)
    del params["digit.weight"]
    with pytest.raises(ValueError, match="missing \\['digit.weight'\\]"):
        registry.create("torch-vectorised", SMALL, params)


def test_availability_that_raises_is_reported_not_fatal():
    class Fragile(TorchCapsNet):
        @classmethod
        def availability(cls, device):
            raise OSError("driver exploded")

    info = registry.ImplementationInfo("fragile", Fragile, "cpu", "vectorised")
    status = info.availability()
    assert not status and "driver exploded" in status.reason


class WrongSoftmaxAxis(TorchCapsNet):
    """The most reported bug of public implementations: coupling normalised over the input capsules."""

    def route(self, u_hat):
        import torch

        from implementations.torch.routing import squash

        logits = u_hat.new_zeros(u_hat.shape[:3])
        for _ in range(self.config.routing_iterations):
            coupling = torch.softmax(logits, dim=1)  # wrong: over i
            v = squash(torch.einsum("bij,bijd->bjd", coupling, u_hat), self.config.squash_eps)
            logits = logits + torch.einsum("bijd,bjd->bij", u_hat, v)
        return v


def test_check_catches_the_wrong_softmax_axis():
    with registry.registered("wrong-softmax", WrongSoftmaxAxis):
        rows = check_implementation("wrong-softmax", SMALL, "float64")
    failed = {row.quantity for row in rows if not row.passed}
    assert "lengths" in failed and "grad digit.weight" in failed
    assert "wrong-softmax" not in registry.names()  # gone again after the with block


def test_registered_refuses_a_taken_name_and_restores_the_registry():
    with pytest.raises(ValueError, match="already registered"):
        with registry.registered("torch-vectorised", WrongSoftmaxAxis):
            pass
    assert registry.get("torch-vectorised").cls is TorchCapsNet
    with pytest.raises(RuntimeError, match="boom"):
        with registry.registered("short-lived", WrongSoftmaxAxis):
            raise RuntimeError("boom")
    assert "short-lived" not in registry.names()


def test_an_implementation_built_with_a_routing_gradient_it_lacks_raises_the_unavailable_error():
    from harness.params import init_parameters
    from harness.spec import SMALL
    from implementations.numpy.capsnet import NumpyCapsNet

    class FullOnly(NumpyCapsNet):
        routing_gradients = ("full",)

    assert issubclass(registry.UnsupportedRoutingGradientError, registry.UnavailableImplementationError)
    assert registry.Implementation.routing_gradients == ("full",)
    final = SMALL.replace(routing_gradient="final")
    with pytest.raises(registry.UnsupportedRoutingGradientError, match="full only, not 'final'"):
        FullOnly(final, init_parameters(final))
    assert FullOnly(SMALL, init_parameters(SMALL)).config.routing_gradient == "full"
    with registry.registered("full-only", FullOnly) as info:
        assert not info.supports("final") and info.supports("full")
