"""Tabular inputs and reference models for interaction scoring.

A table comes from a CSV/Parquet file (read with Polars) or from a dataset shipped with scikit-learn
(`sklearn:breast_cancer`, `sklearn:diabetes`, `sklearn:wine`). Features are standardised on the training
split, so that a scaling `m_i` of the input-scaling class means the same for every feature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import polars as pl
import torch

from featureatlas.tasks.common.threads import intra_op_threads
from featureatlas.tasks.interactions.fis import Layered, LossName, Predictor

SKLEARN_DATASETS = ("breast_cancer", "diabetes", "wine")
ReferenceName = Literal["linear", "gradient_boosting", "mlp"]


class Table(NamedTuple):
    """Standardised features split into train and held-out rows; `task` decides the loss."""

    X_train: np.ndarray  # [n_train, p]
    y_train: np.ndarray  # [n_train]
    X_test: np.ndarray  # [n_test, p]
    y_test: np.ndarray  # [n_test]
    features: list[str]
    task: Literal["classification", "regression"]

    @property
    def loss(self) -> LossName:
        return "log_loss" if self.task == "classification" else "mse"


def _read(source: str, target: str | None) -> tuple[pl.DataFrame, str]:
    if source.startswith("sklearn:"):
        from sklearn import datasets

        name = source.removeprefix("sklearn:")
        if name not in SKLEARN_DATASETS:
            raise ValueError(
                f"unknown dataset {source!r}; available: sklearn:{', sklearn:'.join(SKLEARN_DATASETS)}"
            )
        bunch = getattr(datasets, f"load_{name}")(as_frame=True)
        return pl.from_pandas(bunch.frame), target or "target"
    path = Path(source)
    if not path.exists():
        raise ValueError(f"table {source!r} not found; give a .csv or .parquet file or sklearn:<dataset>")
    if target is None:
        raise ValueError(f"table {source!r}: set `interactions.target` to the name of the target column")
    match path.suffix:
        case ".csv":
            return pl.read_csv(path), target
        case ".parquet":
            return pl.read_parquet(path), target
        case other:
            raise ValueError(f"table {source!r}: suffix {other!r} not read; use .csv or .parquet")


def load_table(
    source: str,
    target: str | None,
    task: Literal["auto", "classification", "regression"],
    heldout: float,
    seed: int,
) -> Table:
    """Read, check and split a table; every problem is reported with what to change."""
    df, target = _read(source, target)
    return split_frame(df, target, source, task, heldout, seed)


def split_rows(n: int, heldout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training and held-out row indices of an `n`-row table (the one split every step uses)."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(heldout * n)))
    return order[n_test:], order[:n_test]


def split_frame(
    df: pl.DataFrame,
    target: str,
    source: str,
    task: Literal["auto", "classification", "regression"],
    heldout: float,
    seed: int,
) -> Table:
    """Check, standardise and split a frame read from `source` (named in the messages)."""
    if target not in df.columns:
        raise ValueError(f"{source}: target column {target!r} not found; columns: {', '.join(df.columns)}")
    feats = [c for c in df.columns if c != target]
    bad = [c for c in feats if not df[c].dtype.is_numeric()]
    if bad:
        raise ValueError(f"{source}: non-numeric feature columns {bad}; encode them as numbers or drop them")
    nans = {
        c: int(df[c].is_null().sum() + (df[c].is_nan().sum() if df[c].dtype.is_float() else 0))
        for c in df.columns
    }
    nans = {c: k for c, k in nans.items() if k}
    if nans:
        raise ValueError(f"{source}: missing values (column: count) {nans}; impute or drop those rows first")
    X = df.select(feats).to_numpy().astype(np.float64)
    const = [c for c, s in zip(feats, X.std(0)) if s == 0]
    if const:
        raise ValueError(f"{source}: constant feature columns {const} carry no information; drop them")
    y = df[target].to_numpy()
    if task == "auto":
        task = (
            "classification"
            if (not np.issubdtype(y.dtype, np.floating) or len(np.unique(y)) <= 10)
            else "regression"
        )
    if task == "classification":
        y = np.unique(y, return_inverse=True)[1].astype(np.float64)
    train, test = split_rows(len(y), heldout, seed)
    mu, sd = X[train].mean(0), X[train].std(0)
    sd[sd == 0] = 1.0
    X = (X - mu) / sd
    return Table(X[train], y[train].astype(np.float64), X[test], y[test].astype(np.float64), feats, task)


def _sklearn_predictor(est, task: str, n_classes: int) -> Predictor:
    def f(Z: torch.Tensor) -> torch.Tensor:
        x = Z.detach().cpu().numpy()
        if task == "regression":
            out = est.predict(x)
        else:
            out = est.predict_proba(x)
            out = out[:, 1] if n_classes == 2 else out
        return torch.as_tensor(out, dtype=Z.dtype)

    return f


def _output_head(task: str, out: int):
    """Pre-activations of the last layer `[..., n, out]` -> predictions, as `fis.Predictor` returns them."""
    if task == "regression":
        return lambda z: z.squeeze(-1)
    if out == 1:
        return lambda z: torch.sigmoid(z.squeeze(-1))
    return lambda z: torch.softmax(z, -1)


def _linear_predictor(est, task: str, n_classes: int) -> Layered:
    """Logistic or ridge regression as `Layered` (so scoring takes the rank-|S| path); the same maths as
    `predict_proba`/`predict`: a sigmoid (binary), a softmax (multinomial) or nothing on `X @ coef.T + b`."""
    W = torch.as_tensor(np.atleast_2d(est.coef_), dtype=torch.float64)
    b = torch.as_tensor(np.atleast_1d(est.intercept_), dtype=torch.float64)
    return Layered(W, b, _output_head(task, 1 if n_classes <= 2 else n_classes))


def _mlp(table: Table, n_classes: int, seed: int, rows: np.ndarray | None) -> Layered:
    torch.manual_seed(seed)
    p = table.X_train.shape[1]
    out = 1 if table.task == "regression" or n_classes == 2 else n_classes
    net = torch.nn.Sequential(torch.nn.Linear(p, 32), torch.nn.ReLU(), torch.nn.Linear(32, out)).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    X, y = torch.as_tensor(table.X_train), torch.as_tensor(table.y_train)
    if rows is not None:
        X, y = X[rows], y[rows]
    # a net this small trains ~10x faster on one thread: synchronising threads costs more than it saves
    with intra_op_threads(1):
        _train(net, opt, X, y, table.task, out)
    net.eval().requires_grad_(False)
    first, last, output = net[0], net[2], _output_head(table.task, out)
    return Layered(first.weight, first.bias, lambda H: output(last(torch.relu(H))))


def _train(
    net: torch.nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, task: str, out: int
) -> None:
    for _ in range(300):
        opt.zero_grad()
        z = net(X)
        if task == "regression":
            loss = torch.nn.functional.mse_loss(z.squeeze(1), y)
        elif out == 1:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z.squeeze(1), y)
        else:
            loss = torch.nn.functional.cross_entropy(z, y.long())
        loss.backward()
        opt.step()


def fit_reference(name: ReferenceName, table: Table, seed: int, rows: np.ndarray | None = None) -> Predictor:
    """Fit the named learner on the training split (or on its `rows`, e.g. a bootstrap sample); returns a
    torch-in, torch-out predictor (`Layered` for the linear models and the MLP)."""
    n_classes = len(np.unique(table.y_train)) if table.task == "classification" else 0
    X, y = (table.X_train, table.y_train) if rows is None else (table.X_train[rows], table.y_train[rows])
    if n_classes and len(np.unique(y)) < n_classes:
        raise ValueError(
            f"a training sample holds only {len(np.unique(y))} of the {n_classes} classes; use more rows "
            "or a smaller `interactions.heldout_fraction`"
        )
    match name:
        case "linear":
            from sklearn.linear_model import LogisticRegression, Ridge

            est = LogisticRegression(max_iter=2000) if n_classes else Ridge(alpha=1.0)
            est.fit(X, y)
            return _linear_predictor(est, table.task, n_classes)
        case "gradient_boosting":
            from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

            cls = GradientBoostingClassifier if n_classes else GradientBoostingRegressor
            est = cls(n_estimators=100, max_depth=3, random_state=seed)
        case "mlp":
            return _mlp(table, n_classes, seed, rows)
        case other:
            raise ValueError(
                f"reference model {other!r} not known; use 'linear', 'gradient_boosting' or 'mlp'"
            )
    est.fit(X, y)
    return _sklearn_predictor(est, table.task, n_classes)
