import pytest
import torch

from libe_cnn.config import MODEL_NAMES
from libe_cnn.flat import copy_into, flatten_gradients, flatten_parameters
from mnist.model import (
    NORM_GROUPS,
    OPTIMIZER_STATE,
    RESNET_WIDTHS,
    Net,
    ResNet18,
    build_model,
    evaluate,
    load_optimizer_state_vector,
    make_optimizer,
    optimizer_state_vector,
)


def test_output_shape_and_log_probabilities():
    out = Net()(torch.zeros(5, 1, 28, 28))
    assert out.shape == (5, 10)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(5))


def test_parameter_count():
    assert sum(p.numel() for p in Net().parameters()) == 1_199_882


def test_same_seed_same_weights_different_seed_different_weights():
    a, b, c = build_model(1), build_model(1), build_model(2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_build_model_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_model(1)
    assert torch.equal(torch.rand(3), expected)


def test_no_dropout_is_deterministic_in_train_mode():
    model = build_model(0, dropout=False).train()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), model(x))


def test_flat_parameters_are_views():
    model = build_model(0)
    before = [p.detach().clone() for p in model.parameters()]
    flat = flatten_parameters(model)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    flat.zero_()
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())
    new = torch.arange(flat.numel(), dtype=torch.float32)
    copy_into(flat, new.numpy())
    assert float(model.fc2.bias.detach()[-1]) == flat.numel() - 1


def test_backward_accumulates_into_flat_gradient():
    model = build_model(0, dropout=False)
    flatten_parameters(model)
    flat_grad = flatten_gradients(model)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    reference = build_model(0, dropout=False)
    torch.nn.functional.nll_loss(reference(x), y).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    for _ in range(2):  # the second pass checks zero_() resets the shared buffer
        flat_grad.zero_()
        torch.nn.functional.nll_loss(model(x), y).backward()
        torch.testing.assert_close(flat_grad, expected)
        start, end = flat_grad.data_ptr(), flat_grad.data_ptr() + 4 * flat_grad.numel()
        assert all(start <= p.grad.data_ptr() < end for p in model.parameters())
    assert flat_grad.shape == (1_199_882,)


def test_evaluate_on_known_labels():
    model = build_model(0)
    x = torch.randn(30, 1, 28, 28)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    loss, acc = evaluate(model.train(), x, y, batch_size=7)
    assert acc == 1.0 and loss > 0
    assert model.training  # evaluate restores the mode


@pytest.mark.parametrize("name", sorted(OPTIMIZER_STATE))
def test_optimizer_state_vector_restores_the_optimizer_exactly(name):
    """A worker's optimizer state, packed into one vector and loaded into a fresh optimizer."""
    def stepped_model():
        model = build_model(0)
        return model, flatten_parameters(model), flatten_gradients(model)

    model, params, grad = stepped_model()
    optimizer = make_optimizer(name, model.parameters(), 1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        grad.copy_(torch.randn(grad.shape, generator=generator))
        optimizer.step()
    assert set(optimizer.state[next(model.parameters())]) == set(OPTIMIZER_STATE[name])
    vector = optimizer_state_vector(optimizer, name)

    copy, copy_params, copy_grad = stepped_model()
    copy_params.copy_(params)
    copy_optimizer = make_optimizer(name, copy.parameters(), 1e-2)
    load_optimizer_state_vector(copy_optimizer, name, vector)
    next_grad = torch.randn(grad.shape, generator=generator)
    for g, o in ((grad, optimizer), (copy_grad, copy_optimizer)):
        g.copy_(next_grad)
        o.step()
    assert torch.equal(params, copy_params)  # a fresh optimizer would have stepped differently
    with pytest.raises(ValueError, match="does not fit"):
        load_optimizer_state_vector(copy_optimizer, name, vector[:-1])


@pytest.mark.parametrize("dataset, shape, classes", [("cifar10", (5, 3, 32, 32), 10), ("iris", (5, 4), 3)])
def test_the_dataset_chooses_the_network(dataset, shape, classes):
    model = build_model(3, dataset=dataset)
    out = model(torch.zeros(shape))
    assert out.shape == (5, classes) and torch.allclose(out.exp().sum(1), torch.ones(5))
    same = build_model(3, dataset=dataset)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))


# --- every network as a chain of layers; the ResNets (--model) ---

SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32), "iris": (4,)}
NETWORKS = [(dataset, "cnn") for dataset in SHAPES] + [
    (dataset, model) for model in ("resnet18-narrow", "resnet18") for dataset in ("fashion-mnist", "cifar10")]


def sample(dataset, batch, seed=0):
    return torch.randn(batch, *SHAPES[dataset], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dataset, model", NETWORKS)
def test_layers_compose_to_the_forward_and_hold_the_parameters_in_order(dataset, model):
    net = build_model(0, dropout=False, dataset=dataset, model=model)
    layers = net.layers()
    assert [id(p) for layer in layers for p in layer.parameters()] == [id(p) for p in net.parameters()]
    x = sample(dataset, 3)
    for training in (False, True):
        net.train(training)
        with torch.no_grad():
            out, composed = net(x), x
            for layer in layers:
                composed = layer(composed)
        assert torch.equal(composed, out)
    classes = 3 if dataset == "iris" else 10
    assert out.shape == (3, classes)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(3))
    assert (out <= 0).all()


@pytest.mark.parametrize("dataset, model", NETWORKS)
def test_same_seed_same_weights_for_every_network(dataset, model):
    a, b = build_model(4, dataset=dataset, model=model), build_model(4, dataset=dataset, model=model)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    c = build_model(5, dataset=dataset, model=model)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


@pytest.mark.parametrize("dataset, model, count", [
    ("mnist", "cnn", 1_199_882), ("fashion-mnist", "cnn", 1_199_882), ("cifar10", "cnn", 1_116_970), ("iris", "cnn", 131),
    ("fashion-mnist", "resnet18-narrow", 701_178), ("cifar10", "resnet18-narrow", 701_466),
    ("fashion-mnist", "resnet18", 11_172_810), ("cifar10", "resnet18", 11_173_962)])
def test_parameter_counts(dataset, model, count):
    net = build_model(0, dataset=dataset, model=model)
    assert sum(p.numel() for p in net.parameters()) == count
    if model == "resnet18" and dataset == "cifar10":
        assert 11.0e6 < count < 11.3e6  # the standard ResNet-18 for CIFAR-10


@pytest.mark.parametrize("model, width", [("resnet18-narrow", 16), ("resnet18", 64)])
def test_resnet_layout(model, width):
    net = build_model(0, dataset="cifar10", model=model)
    assert isinstance(net, ResNet18) and len(net.layers()) == 10
    assert list(net.buffers()) == []  # no running statistics: only parameters need to travel
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)) for m in net.modules())
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == NORM_GROUPS for m in norms)
    widths = [block.conv2.out_channels for block in net.blocks]
    assert widths == [width] * 2 + [2 * width] * 2 + [4 * width] * 2 + [8 * width] * 2
    strides = [block.conv1.stride[0] for block in net.blocks]
    assert strides == [1, 1, 2, 1, 2, 1, 2, 1]
    projections = [not isinstance(block.shortcut, torch.nn.Identity) for block in net.blocks]
    assert projections == [False, False, True, False, True, False, True, False]
    assert net.conv1.stride == (1, 1) and net.conv1.kernel_size == (3, 3)


@pytest.mark.parametrize("dataset, model", [n for n in NETWORKS if n[1] != "cnn"])
def test_a_sample_s_output_does_not_depend_on_the_rest_of_its_batch(dataset, model):
    """GroupNorm is per sample: what the pipeline's micro-batches and the shards rely on."""
    net = build_model(0, dataset=dataset, model=model).train()
    x = sample(dataset, 8)
    with torch.no_grad():
        whole = net(x)
        halves = torch.cat([net(x[:4]), net(x[4:])])
    torch.testing.assert_close(halves, whole, rtol=0, atol=1e-6)


def test_model_names_match_the_config():
    assert ("cnn", *RESNET_WIDTHS) == MODEL_NAMES


@pytest.mark.parametrize("dataset, model", [("iris", "resnet18"), ("iris", "resnet18-narrow"),
                                            ("mnist", "resnet50"), ("imagenet", "cnn")])
def test_a_model_the_dataset_cannot_take_is_refused(dataset, model):
    with pytest.raises(ValueError) as error:
        build_model(0, dataset=dataset, model=model)
    assert "\n" not in str(error.value)
