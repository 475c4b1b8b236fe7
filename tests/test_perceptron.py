"""Chapter 1.1: the perceptron learns AND/OR, cannot learn XOR; a two-layer ReLU net can."""
import pytest
import torch

from minidiff.nn import MLP, Perceptron, relu


X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
TRUTH = {"and": [0, 0, 0, 1], "or": [0, 1, 1, 1], "xor": [0, 1, 1, 0]}


def test_relu():
    x = torch.randn(5, 7, requires_grad=True)
    y = relu(x)
    assert torch.equal(y, torch.nn.functional.relu(x))
    y.sum().backward()
    assert torch.equal(x.grad, (x > 0).float())  # derivative: 1 where active, 0 elsewhere


@pytest.mark.parametrize("gate", ["and", "or"])
def test_perceptron_learns_linearly_separable_gates(gate):
    y = torch.tensor(TRUTH[gate])
    p = Perceptron(2)
    history = p.fit(X, y, lr=1.0, epochs=100)
    assert history[-1] == 1.0
    assert len(history) < 100  # converged (an epoch without updates) well before the limit (Novikoff's theorem)
    assert torch.equal(p.predict(X), y)
    # the learnt hyperplane really separates the classes: positive side for 1, non-positive for 0
    a = p.decision_function(X)
    assert (a[y == 1] > 0).all() and (a[y == 0] <= 0).all()


def test_perceptron_cannot_fit_xor():
    # XOR is not linearly separable: a line w·x + b = 0 with (0,1) and (1,0) on the positive side and (0,0), (1,1)
    # on the other would need b <= 0, w1 + b > 0, w2 + b > 0 and w1 + w2 + b <= 0; adding the middle two gives
    # w1 + w2 + 2b > 0, i.e. w1 + w2 + b > -b >= 0, a contradiction. So at most 3 of the 4 points can ever be
    # right, and the rule keeps updating forever (it cycles) instead of converging.
    y = torch.tensor(TRUTH["xor"])
    p = Perceptron(2)
    history = p.fit(X, y, lr=1.0, epochs=500)
    assert len(history) == 500       # never an epoch without a mistake
    assert max(history) <= 0.75      # no epoch ever reaches 100%
    for lr in (0.1, 0.01):           # nor does any other step size
        assert max(Perceptron(2).fit(X, y, lr=lr, epochs=200)) < 1.0


def test_two_layer_relu_net_fits_xor():
    y = torch.tensor(TRUTH["xor"])
    net = MLP((2, 16, 1))
    assert len(net.layers) == 2
    history = net.fit(X, y, lr=0.5, epochs=500)
    assert history[-1] == 1.0
    assert torch.equal(net.predict(X), y)
    logits = net(X)[:, 0]
    assert (logits[y == 1] > 0).all() and (logits[y == 0] < 0).all()


def test_mlp_shapes_and_multiclass():
    net = MLP((4, 8, 8, 3))
    assert net(torch.randn(10, 4)).shape == (10, 3)
    # a linearly separable 3-class toy problem is learnt with the cross-entropy loss
    centers = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    labels = torch.arange(3).repeat_interleave(20)
    Xc = centers[labels] + 0.3 * torch.randn(60, 4)
    history = net.fit(Xc, labels, lr=0.2, epochs=300)
    assert history[-1] == 1.0
