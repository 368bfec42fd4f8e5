"""Accuracy predictors of the surrogate searcher, and the choice between them by Kendall τ.

NSGANetV2 (Lu et al., ECCV 2020), which the AEBNAS paper searches with, fits a predictor of
accuracy from an architecture's encoding on the candidates evaluated so far and picks among
several kinds by cross-validated ranking quality ("adaptive switching"): what matters to the
search is the *order* a predictor gives, so candidates are chosen by Kendall τ, not by error.

All four work on the numeric features of :meth:`search_spaces.encoding.Encoding.features`,
scaled to [0, 1] per feature on the training rows, and are deterministic for a seed:

- ``rbf``: cubic radial-basis interpolation with a linear tail (NSGANetV2's default, as in
  pySOT), a small ridge term so that duplicate rows do not make it singular;
- ``gp``: a Gaussian process with a squared-exponential kernel, length scale and noise picked
  by the log marginal likelihood over a small grid;
- ``trees``: a bagged ensemble of regression trees (random feature subsets per split);
- ``mlp``: a two-layer perceptron (torch, 32 units), trained with Adam and strong weight decay
  (0.1: with ~80 features and tens of rows it overfits otherwise) on standardised targets.

Only numpy and torch: no dependency is added for them.
"""

from __future__ import annotations

from itertools import combinations
from typing import Callable, Sequence

import numpy as np

PREDICTORS = ("rbf", "gp", "trees", "mlp")


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's τ-b of two equally long sequences (NaN when either is constant or shorter than 2)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"kendall_tau needs two sequences of one length, got {a.shape} and {b.shape}")
    concordant = discordant = ties_a = ties_b = 0
    for i, j in combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif (da > 0) == (db > 0):
            concordant += 1
        else:
            discordant += 1
    denom = ((concordant + discordant + ties_a) * (concordant + discordant + ties_b)) ** 0.5
    return (concordant - discordant) / denom if denom else float("nan")


class Predictor:
    """Base: ``fit(X, y)`` then ``predict(X)``; X is scaled to [0, 1] with the training rows' range."""

    name = "base"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._low: np.ndarray | None = None
        self._span: np.ndarray | None = None

    def _scale(self, X: np.ndarray, fit: bool = False) -> np.ndarray:
        X = np.asarray(X, dtype=float)
        if fit:
            self._low = X.min(axis=0)
            span = X.max(axis=0) - self._low
            self._span = np.where(span > 0, span, 1.0)
        if self._low is None:
            raise RuntimeError(f"{self.name}: predict() before fit()")
        return (X - self._low) / self._span

    def fit(self, X: np.ndarray, y: np.ndarray) -> "Predictor":
        X, y = self._scale(X, fit=True), np.asarray(y, dtype=float)
        if len(X) < 2:
            raise ValueError(f"{self.name}: fitting needs at least 2 rows, got {len(X)}")
        self._fit(X, y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self._predict(self._scale(X))

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def _predict(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class RBF(Predictor):
    """Cubic RBF interpolant φ(r) = r³ with a linear polynomial tail (pySOT's RBFInterpolant)."""

    name = "rbf"

    def __init__(self, seed: int = 0, ridge: float = 1e-6) -> None:
        super().__init__(seed)
        self.ridge = ridge

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        n, d = X.shape
        phi = _distances(X, X) ** 3
        P = np.hstack([np.ones((n, 1)), X])
        A = np.zeros((n + d + 1, n + d + 1))
        A[:n, :n] = phi + self.ridge * np.eye(n)
        A[:n, n:] = P
        A[n:, :n] = P.T
        rhs = np.concatenate([y, np.zeros(d + 1)])
        coef = np.linalg.lstsq(A, rhs, rcond=None)[0]
        self._X, self._w, self._c = X, coef[:n], coef[n:]

    def _predict(self, X: np.ndarray) -> np.ndarray:
        return _distances(X, self._X) ** 3 @ self._w + self._c[0] + X @ self._c[1:]


class GP(Predictor):
    """Gaussian process mean, squared-exponential kernel; hyper-parameters by marginal likelihood."""

    name = "gp"
    LENGTHS = (0.25, 0.5, 1.0, 2.0, 4.0)
    NOISES = (1e-3, 1e-2, 1e-1, 0.5)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        self._mean, self._std = y.mean(), y.std() or 1.0
        t = (y - self._mean) / self._std
        d2 = _distances(X, X) ** 2
        best = None
        for length in self.LENGTHS:
            K0 = np.exp(-0.5 * d2 / (length ** 2 * X.shape[1]))
            for noise in self.NOISES:
                try:
                    L = np.linalg.cholesky(K0 + noise * np.eye(len(X)))
                except np.linalg.LinAlgError:
                    continue
                alpha = np.linalg.solve(L.T, np.linalg.solve(L, t))
                loglik = -0.5 * t @ alpha - np.log(np.diag(L)).sum()
                if best is None or loglik > best[0]:
                    best = (loglik, length, alpha)
        if best is None:
            raise np.linalg.LinAlgError("gp: no kernel of the grid could be factorised")
        _, self._length, self._alpha = best
        self._X = X

    def _predict(self, X: np.ndarray) -> np.ndarray:
        k = np.exp(-0.5 * _distances(X, self._X) ** 2 / (self._length ** 2 * X.shape[1]))
        return self._mean + self._std * (k @ self._alpha)


class Trees(Predictor):
    """Bagged regression trees (a random forest): each tree on a bootstrap sample, each split on the
    best of a random third of the features, leaves of at least ``min_leaf`` rows."""

    name = "trees"

    def __init__(self, seed: int = 0, n_trees: int = 30, min_leaf: int = 2, max_depth: int = 10) -> None:
        super().__init__(seed)
        self.n_trees, self.min_leaf, self.max_depth = n_trees, min_leaf, max_depth

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed)
        n, d = X.shape
        k = max(1, d // 3)
        self._trees = []
        for _ in range(self.n_trees):
            rows = rng.integers(0, n, n)
            self._trees.append(self._grow(X[rows], y[rows], rng, k, 0))

    def _grow(self, X: np.ndarray, y: np.ndarray, rng: np.random.Generator, k: int, depth: int) -> tuple:
        if depth >= self.max_depth or len(y) < 2 * self.min_leaf or np.all(y == y[0]):
            return ("leaf", float(y.mean()))
        best = None
        n = len(y)
        for f in rng.choice(X.shape[1], size=min(k, X.shape[1]), replace=False):
            order = np.argsort(X[:, f], kind="stable")
            xs, ys = X[order, f], y[order]
            # SSE of every cut at once from cumulative sums: left = first i+1 rows, right = the rest.
            s1, s2 = np.cumsum(ys), np.cumsum(ys ** 2)
            nl = np.arange(1, n)
            left = s2[:-1] - s1[:-1] ** 2 / nl
            right = (s2[-1] - s2[:-1]) - (s1[-1] - s1[:-1]) ** 2 / (n - nl)
            valid = (xs[1:] > xs[:-1]) & (nl >= self.min_leaf) & (n - nl >= self.min_leaf)
            if not valid.any():
                continue
            sse = np.where(valid, left + right, np.inf)
            i = int(np.argmin(sse))
            if best is None or sse[i] < best[0]:
                cut = (xs[i] + xs[i + 1]) / 2
                best = (sse[i], f, cut, X[:, f] <= cut)
        if best is None:
            return ("leaf", float(y.mean()))
        _, f, cut, left = best
        return ("split", int(f), float(cut), self._grow(X[left], y[left], rng, k, depth + 1),
                self._grow(X[~left], y[~left], rng, k, depth + 1))

    def _predict(self, X: np.ndarray) -> np.ndarray:
        def one(tree: tuple, x: np.ndarray) -> float:
            while tree[0] == "split":
                tree = tree[3] if x[tree[1]] <= tree[2] else tree[4]
            return tree[1]

        return np.array([np.mean([one(t, x) for t in self._trees]) for x in X])


class MLP(Predictor):
    """Two hidden layers of ``hidden`` units (ReLU), Adam on standardised targets, full batch."""

    name = "mlp"

    def __init__(self, seed: int = 0, hidden: int = 32, steps: int = 300, lr: float = 3e-3,
                 weight_decay: float = 0.1) -> None:
        super().__init__(seed)
        self.hidden, self.steps, self.lr, self.weight_decay = hidden, steps, lr, weight_decay

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        import torch

        self._mean, self._std = y.mean(), y.std() or 1.0
        gen = torch.Generator().manual_seed(self.seed)
        d = X.shape[1]
        layers = [torch.nn.Linear(d, self.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hidden, self.hidden),
                  torch.nn.ReLU(), torch.nn.Linear(self.hidden, 1)]
        with torch.no_grad():
            for layer in layers:
                if isinstance(layer, torch.nn.Linear):
                    bound = 1 / layer.in_features ** 0.5
                    layer.weight.uniform_(-bound, bound, generator=gen)
                    layer.bias.uniform_(-bound, bound, generator=gen)
        self._net = torch.nn.Sequential(*layers).double()
        opt = torch.optim.Adam(self._net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        xs = torch.as_tensor(X, dtype=torch.float64)
        ts = torch.as_tensor((y - self._mean) / self._std, dtype=torch.float64)[:, None]
        for _ in range(self.steps):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(self._net(xs), ts)
            loss.backward()
            opt.step()

    def _predict(self, X: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self._net(torch.as_tensor(X, dtype=torch.float64))[:, 0].numpy()
        return self._mean + self._std * out


_KINDS: dict[str, Callable[[int], Predictor]] = {"rbf": RBF, "gp": GP, "trees": Trees, "mlp": MLP}


def make_predictor(name: str, seed: int = 0) -> Predictor:
    if name not in _KINDS:
        raise ValueError(f"predictor {name!r} is not one of {PREDICTORS}")
    return _KINDS[name](seed)


def cross_validated_tau(name: str, X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Mean Kendall τ of predictor ``name`` on held-out folds (a shuffled split into ``folds`` folds, fewer
    when the archive is small: every held-out fold has at least 2 rows)."""
    n = len(y)
    order = np.random.default_rng(seed).permutation(n)
    folds = max(1, min(folds, n // 2))
    taus = []
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        if len(train) < 2 or len(test) < 2:
            continue
        pred = make_predictor(name, seed).fit(X[train], y[train]).predict(X[test])
        tau = kendall_tau(pred, y[test])
        if tau == tau:
            taus.append(tau)
    return float(np.mean(taus)) if taus else float("nan")


def choose_predictor(X: np.ndarray, y: np.ndarray, names: Sequence[str] = PREDICTORS, folds: int = 5,
                     seed: int = 0) -> tuple[Predictor, dict[str, float]]:
    """NSGANetV2's adaptive switching: the kind with the best cross-validated τ, refitted on all rows.
    Returns it and every kind's τ (NaN: could not tell, e.g. constant targets)."""
    taus = {name: cross_validated_tau(name, X, y, folds, seed) for name in names}
    ranked = sorted(names, key=lambda name: -np.nan_to_num(taus[name], nan=-2.0))
    return make_predictor(ranked[0], seed).fit(X, y), taus


def _distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    d2 = (A ** 2).sum(1)[:, None] + (B ** 2).sum(1)[None, :] - 2 * A @ B.T
    return np.sqrt(np.maximum(d2, 0.0))


__all__ = ["PREDICTORS", "Predictor", "RBF", "GP", "Trees", "MLP", "make_predictor", "kendall_tau",
           "cross_validated_tau", "choose_predictor"]
