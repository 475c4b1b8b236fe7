"""Chapter 1.1 — the perceptron, and why one layer is not enough.

Rosenblatt's perceptron (1958) is a single linear threshold unit:

    ŷ = step(w·x + b),   step(a) = 1 if a > 0 else 0

and his learning rule nudges the weights only when a sample is misclassified:

    w ← w + η (y − ŷ) x,    b ← b + η (y − ŷ)

If the two classes can be separated by a hyperplane, this converges in a finite number of updates (Novikoff,
1962). If they cannot — XOR is the famous example (Minsky & Papert, 1969) — no choice of w, b classifies every
point and the rule cycles forever. One hidden layer with a nonlinearity (ReLU here) fixes that: the hidden units
bend the input space so the output unit sees a linearly separable problem. Training that needs a gradient, so
the `MLP` below uses a smooth loss and gradient descent instead of the threshold rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relu(x):
    """Rectified linear unit, elementwise: relu(x) = max(x, 0). Any shape -> same shape.

    Its derivative is 1 for x > 0 and 0 otherwise, so gradients pass through active units unchanged
    (unlike sigmoid/tanh, whose derivative is < 1 everywhere and shrinks the gradient at every layer).
    """
    return torch.where(x > 0, x, torch.zeros_like(x))


class Perceptron:
    """A single threshold unit trained with Rosenblatt's rule. Not an nn.Module: it learns without gradients.

    w: [n_inputs], b: scalar. predict(X [N, n_inputs]) -> [N] of 0/1.
    """

    def __init__(self, n_inputs: int):
        self.w = torch.zeros(n_inputs)
        self.b = torch.zeros(())

    def decision_function(self, X):
        """The pre-threshold activation w·x + b: X [N, n_inputs] -> [N]."""
        return X.float() @ self.w + self.b

    def predict(self, X):
        """step(w·x + b): X [N, n_inputs] -> [N] long tensor of 0/1."""
        return (self.decision_function(X) > 0).long()

    def fit(self, X, y, lr: float = 1.0, epochs: int = 100):
        """Run the perceptron rule sample by sample for `epochs` passes over (X [N, n], y [N] of 0/1).

        Returns the accuracy on (X, y) after each epoch, a list of floats. It has `epochs` entries unless the rule
        converged first: an epoch without a single update (every sample right) ends training early.
        """
        X, y = X.float(), y.float()
        history = []
        for _ in range(epochs):
            updates = 0
            for xi, yi in zip(X, y):
                err = yi - (xi @ self.w + self.b > 0).float()  # -1, 0 or +1
                if err != 0:
                    self.w = self.w + lr * err * xi
                    self.b = self.b + lr * err
                    updates += 1
            history.append((self.predict(X) == y.long()).float().mean().item())
            if updates == 0:
                break
        return history


class MLP(nn.Module):
    """A multilayer perceptron: Linear -> ReLU -> Linear -> ... -> Linear (no activation after the last).

    sizes = (n_in, h_1, ..., n_out), e.g. MLP((2, 8, 1)) is a two-layer net. x [N, n_in] -> [N, n_out].
    `activation` is applied between layers (default: our `relu`).
    """

    def __init__(self, sizes, activation=relu):
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least (n_in, n_out), got {sizes}")
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
        self.activation = activation

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x

    @torch.no_grad()
    def predict(self, X):
        """Class labels: X [N, n_in] -> [N]. One output: 1 where the logit > 0; several: the argmax."""
        out = self(X.float())
        return (out[:, 0] > 0).long() if out.shape[1] == 1 else out.argmax(dim=1)

    def fit(self, X, y, lr: float = 0.1, epochs: int = 1000, loss: str | None = None):
        """Full-batch gradient descent, θ ← θ − η ∇θ L, for `epochs` steps. Returns per-epoch accuracies.

        loss: "bce" (one output, y [N] of 0/1: binary cross-entropy on the logit), "ce" (several outputs,
        y [N] class indices), or "mse" (y [N, n_out] regression targets; accuracy is then meaningless and the
        history holds the loss instead). Default: "bce" for one output, "ce" otherwise.
        """
        X = X.float()
        n_out = self.layers[-1].out_features
        loss = loss or ("bce" if n_out == 1 else "ce")
        opt = torch.optim.SGD(self.parameters(), lr=lr)
        history = []
        for _ in range(epochs):
            out = self(X)
            if loss == "bce":
                L = F.binary_cross_entropy_with_logits(out[:, 0], y.float())
            elif loss == "ce":
                L = F.cross_entropy(out, y.long())
            elif loss == "mse":
                L = F.mse_loss(out, y.float())
            else:
                raise ValueError(f"loss must be 'bce', 'ce' or 'mse', got {loss!r}")
            opt.zero_grad()
            L.backward()
            opt.step()
            history.append(L.item() if loss == "mse" else (self.predict(X) == y.long()).float().mean().item())
        return history
