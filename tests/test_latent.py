"""Chapter 1.5: PCA recovers a linear latent space down to the noise; an autoencoder beats PCA on a curve."""
import math

import pytest
import torch

from minidiff.nn import PCA, Autoencoder



def linear_latent_data(N=4000, D=10, k=3, sigma=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, k, generator=g)                  # 3 latent factors
    A = torch.randn(k, D, generator=g)                  # linear mixing into 10 dims
    return z @ A + 5.0 + sigma * torch.randn(N, D, generator=g)  # (+ an offset, so centring matters)


def test_pca_reconstructs_linear_latents_to_the_noise_level():
    sigma, D, k = 0.1, 10, 3
    X = linear_latent_data(sigma=sigma)
    pca = PCA(k).fit(X)
    mse = ((pca.reconstruct(X) - X) ** 2).mean().item()
    # The signal lives in a 3-dim subspace; the isotropic noise has σ² in each of the 10 directions. Projecting
    # onto the 3 principal directions keeps the signal and 3 of the noise directions, so the residual is the noise
    # in the other 7: per element, σ²·7/10.
    expected = sigma ** 2 * (D - k) / D
    assert expected / 1.5 < mse < expected * 1.5, (mse, expected)
    # with 2 components a whole signal direction is lost: orders of magnitude above the noise
    mse2 = ((PCA(2).fit(X).reconstruct(X) - X) ** 2).mean().item()
    assert mse2 > 20 * expected
    # the explained variance drops to the noise variance after the 3rd component
    ev = PCA(D).fit(X).explained_variance_
    assert ev[2] > 50 * sigma ** 2
    assert torch.allclose(ev[3:], torch.full((D - k,), sigma ** 2), rtol=0.2)


def test_pca_matches_covariance_eigendecomposition():
    X = linear_latent_data(N=500, sigma=0.3, seed=1)
    pca = PCA(4).fit(X)
    # oracle: eigenvectors of the sample covariance (a different algorithm from our SVD)
    Xc = X.double() - X.double().mean(0)
    evals, evecs = torch.linalg.eigh(Xc.T @ Xc / (len(X) - 1))
    evals, evecs = evals.flip(0), evecs.flip(1)          # largest first
    torch.testing.assert_close(pca.explained_variance_.double(), evals[:4], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pca.explained_variance_ratio_.double(), evals[:4] / evals.sum(), rtol=1e-4, atol=1e-6)
    # same directions up to sign
    cos = (pca.components_.double() * evecs[:, :4].T).sum(1).abs()
    torch.testing.assert_close(cos, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-4)
    # orthonormal components; transform/inverse_transform shapes; the projection is idempotent
    torch.testing.assert_close(pca.components_ @ pca.components_.T, torch.eye(4), rtol=0, atol=1e-5)
    Z = pca.transform(X)
    assert Z.shape == (500, 4) and pca.inverse_transform(Z).shape == (500, 10)
    torch.testing.assert_close(Z.mean(0), torch.zeros(4), rtol=0, atol=1e-3)
    R = pca.reconstruct(X)
    torch.testing.assert_close(pca.reconstruct(R), R, rtol=0, atol=1e-4)
    with pytest.raises(ValueError):
        PCA(11).fit(X)


def helix(N, Q, g, noise=0.01):
    """1.5 turns of a helix, a 1-D curve in 3-D, rotated into 10-D by Q [10, 3]: [N, 10]."""
    t = torch.rand(N, generator=g) * 2 - 1
    angle = 1.5 * math.pi * t
    curve = torch.stack([torch.cos(angle), torch.sin(angle), t], dim=1)  # [N, 3]
    return curve @ Q.T + noise * torch.randn(N, Q.shape[0], generator=g)  # [N, 10]


def test_autoencoder_beats_pca_on_a_curved_manifold():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(10, 3, generator=g))  # orthonormal embedding of 3-D into 10-D
    X_train, X_test = helix(1000, Q, g), helix(500, Q, g)

    pca = PCA(1).fit(X_train)
    mse_pca = ((pca.reconstruct(X_test) - X_test) ** 2).mean().item()

    ae = Autoencoder(10, 1, hidden=(64, 64))
    history = ae.fit(X_train, epochs=150, lr=1e-2, batch_size=128)
    assert history[-1] < history[0] / 10
    assert ae.encode(X_test).shape == (500, 1) and ae.decode(torch.zeros(3, 1)).shape == (3, 10)
    mse_ae = ((ae.reconstruct(X_test) - X_test) ** 2).mean().item()
    # One straight line cannot follow a helix; a 1-D nonlinear code can (held-out data, so not memorised).
    # Typically mse_pca ≈ 0.08 and mse_ae ≈ 0.001-0.008.
    assert mse_ae < mse_pca / 4, (mse_ae, mse_pca)
