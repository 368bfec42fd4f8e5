"""``SurrogateSearch``: the paper's surrogate-assisted NSGA-II (NSGANetV2) as a Ray Tune ``Searcher``.

Each iteration:

1. the first ``initial`` candidates are an initial design: the smallest and the largest network
   of the space and random ones (drawn as Ray Tune draws the space, then made canonical);
2. afterwards, accuracy predictors (:mod:`aebnas.search.predictors`: RBF, Gaussian process, tree
   ensemble, MLP) are fitted on the archive of evaluated candidates and the one with the best
   cross-validated Kendall τ is kept (NSGANetV2's adaptive switching);
3. NSGA-II (pymoo) searches the space's canonical vectors (:mod:`search_spaces.encoding`) on the
   paper's objectives, f1 = predicted top-1 error + λ·MAEP and f2 = MAEP, with
   MAEP = 100·|avg MACs − target| / target. Before a candidate is trained, its average MACs is
   estimated from the exact per-exit costs (:class:`aebnas.cost.macs.PieceCosts`: ptflops once per
   block or branch module, then look-ups): the thresholds can bring a network's average anywhere
   between sending every input out at the first exit and running the static network, so the
   estimate is the target clipped to that interval;
4. ``batch_size`` new candidates spread along the predicted front are suggested.

Only full-fidelity results enter the archive (the trial's last report is its last epoch;
a trial ASHA stopped early is remembered as seen, not learnt from). The archive, the queue
and the iteration log are saved with Ray Tune's searcher checkpoints, so ``--resume`` goes on
where the search stopped; each iteration is also appended to ``surrogate_log.jsonl`` in the
experiment directory and printed: the predictor chosen, its cross-validated τ, and once the
batch is evaluated, its τ on that batch.

Works with ``ConcurrencyLimiter(batch=True)`` (``aebnas.search.experiment`` wraps it so), which makes
every iteration wait for the previous batch.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from ray.tune.search import Searcher
from search_spaces.encoding import Encoding

from ..config import ArchConfig
from ..cost.macs import PieceCosts
from .pareto import non_dominated_fronts
from .predictors import PREDICTORS, choose_predictor, kendall_tau
from ..settings import PAPER_LAMBDA

LOG_FILE = "surrogate_log.jsonl"


class SurrogateSearch(Searcher):
    """Surrogate-assisted NSGA-II over a param space of ``tune.choice`` samplers (see the module docstring).

    ``param_space``: the space (samplers and fixed values), or None to take Ray Tune's
    ``param_space`` (then every key of a suggestion is set, inactive ones to their canonical value).
    ``target_macs``, ``score_lambda``: the paper's objectives. ``batch_size``: candidates per
    iteration. ``initial``: size of the initial design. ``predictors``: kinds to switch between.
    ``population``, ``generations``: of NSGA-II on the predictor. ``log_dir``: where
    ``surrogate_log.jsonl`` goes (None: printed only).
    """

    def __init__(self, param_space: Mapping[str, Any] | None = None, *, target_macs: float,
                 score_lambda: float = PAPER_LAMBDA, batch_size: int = 8, initial: int = 16,
                 predictors: Sequence[str] = PREDICTORS, population: int = 100, generations: int = 30,
                 seed: int = 0, log_dir: str | None = None, metric: str = "score", mode: str = "max") -> None:
        super().__init__(metric=metric, mode=mode)
        if not target_macs > 0:
            raise ValueError(f"target_macs={target_macs!r} must be > 0 (MMACs)")
        if batch_size < 1 or initial < 2:
            raise ValueError(f"batch_size={batch_size} must be ≥ 1 and initial={initial} ≥ 2")
        unknown = sorted(set(predictors) - set(PREDICTORS))
        if unknown or not predictors:
            raise ValueError(f"predictors={list(predictors)!r}: choose from {PREDICTORS}")
        require_pymoo()
        self.target_macs, self.score_lambda = float(target_macs), float(score_lambda)
        self.batch_size, self.initial = int(batch_size), int(initial)
        self.predictors = tuple(predictors)
        self.population, self.generations, self.seed = int(population), int(generations), int(seed)
        self.log_dir = log_dir
        self._encoding = None
        self._complete_configs = False
        if param_space is not None:
            self._set_space(param_space)
        self._costs = PieceCosts()
        self._rng = random.Random(seed)
        self._archive: list[dict[str, Any]] = []   # {"vector", "accuracy", "avg_macs", "trial_id"}
        self._queue: list[tuple[int, tuple[int, ...]]] = []   # (iteration, vector) not suggested yet
        self._live: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._seen: set[tuple[int, ...]] = set()
        self._iterations: list[dict[str, Any]] = []
        self._stopped_early = 0

    # ------------------------------------------------------------ Ray Tune's Searcher API
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        if self._encoding is not None:
            return False  # the space was given: Ray Tune's param_space must hold fixed values only
        self._set_space(config)
        self._complete_configs = True
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self._encoding is None:
            raise RuntimeError("SurrogateSearch has no space: pass param_space or give the Tuner a param_space")
        if not self._queue:
            self._propose()
        if not self._queue:
            return None
        iteration, vector = self._queue.pop(0)
        self._live[trial_id] = (iteration, vector)
        config = self._encoding.decode(vector)
        if self._complete_configs:  # Ray Tune would leave a sampler in every key we do not set
            config = {**self._encoding.every_key(vector), **config}  # queued vectors are canonical
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        entry = self._live.pop(trial_id, None)
        if entry is None:
            return
        iteration, vector = entry
        record = self._iterations[iteration] if iteration < len(self._iterations) else None
        ok = not error and result is not None and "accuracy" in result and "avg_macs" in result
        full = ok and result.get("epoch", 0) == result.get("epochs", 0)
        if ok and not full:
            self._stopped_early += 1
        if full:
            self._archive.append({"vector": list(vector), "accuracy": float(result["accuracy"]),
                                  "avg_macs": float(result["avg_macs"]), "trial_id": trial_id})
        if record is not None:
            record["measured"][_key(vector)] = float(result["accuracy"]) if full else None
            self._maybe_close(record)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def get_state(self) -> dict[str, Any]:
        return {"archive": self._archive, "queue": self._queue, "live": self._live, "seen": self._seen,
                "iterations": self._iterations, "rng": self._rng.getstate(), "stopped_early": self._stopped_early,
                "costs": self._costs, "complete_configs": self._complete_configs,
                "encoding": self._encoding, "metric": self._metric, "mode": self._mode}

    def set_state(self, state: dict[str, Any]) -> None:
        self._archive, self._queue, self._seen = state["archive"], state["queue"], state["seen"]
        self._iterations, self._stopped_early = state["iterations"], state["stopped_early"]
        self._rng.setstate(state["rng"])
        self._costs, self._complete_configs = state["costs"], state["complete_configs"]
        if self._encoding is None:
            self._encoding = state["encoding"]
        self._metric, self._mode = state["metric"], state["mode"]
        # Trials that were running when the driver stopped are run again by Ray Tune under the same
        # id (their config is in the experiment state), so they stay live.
        self._live = state["live"]

    # ------------------------------------------------------------ what the search learnt
    @property
    def archive(self) -> list[dict[str, Any]]:
        """Evaluated full-fidelity candidates: vector, validation accuracy, avg MACs, trial id."""
        return list(self._archive)

    @property
    def iterations(self) -> list[dict[str, Any]]:
        """One record per iteration: kind, predictor, cross-validated τ per kind, batch τ."""
        return list(self._iterations)

    # ------------------------------------------------------------ proposing
    def _set_space(self, param_space: Mapping[str, Any]) -> None:
        self._encoding = Encoding(param_space)

    def _propose(self) -> None:
        """Fill the queue with the next iteration's candidates."""
        enc = self._encoding
        iteration = len(self._iterations)
        record: dict[str, Any] = {"iteration": iteration, "archive": len(self._archive)}
        if iteration == 0:
            vectors = [self._extreme(smallest=True), self._extreme(smallest=False)]
            vectors += self._random_unseen(self.initial - 2, exclude=vectors)
            record.update(kind="initial design", predictor=None, cv_tau={})
        elif len(self._archive) < 3:
            vectors = self._random_unseen(self.batch_size)
            record.update(kind="random (archive too small to fit)", predictor=None, cv_tau={})
        else:
            X = enc.features(np.array([a["vector"] for a in self._archive]))
            y = np.array([a["accuracy"] for a in self._archive])
            predictor, taus = choose_predictor(X, y, self.predictors, seed=self.seed + iteration)
            vectors, predicted = self._nsga2(predictor, iteration)
            record.update(kind="surrogate", predictor=predictor.name, cv_tau=taus,
                          predicted={_key(v): float(p) for v, p in zip(vectors, predicted)})
        vectors = [tuple(int(x) for x in v) for v in vectors]
        for v in vectors:
            self._seen.add(v)
        record.update(proposed=len(vectors), measured={_key(v): None for v in vectors}, batch_tau=None,
                      closed=False)
        self._iterations.append(record)
        self._queue.extend((iteration, v) for v in vectors)
        cv = ", ".join(f"{k} {v:.2f}" for k, v in record["cv_tau"].items() if v == v)
        self._log(f"aebnas: surrogate iteration {iteration}: {record['kind']}"
                  + (f", predictor {record['predictor']} (cross-validated τ: {cv})" if record["predictor"] else "")
                  + f"; archive {len(self._archive)}, proposing {len(vectors)}", record)

    def _maybe_close(self, record: dict[str, Any]) -> None:
        """Once every candidate of an iteration is back: τ between its predicted and measured accuracy."""
        if record["closed"] or any(k for k, v in record["measured"].items() if v is None and self._is_live(k)):
            return
        record["closed"] = True
        pairs = [(record.get("predicted", {}).get(k), v) for k, v in record["measured"].items() if v is not None]
        pairs = [(p, m) for p, m in pairs if p is not None]
        if len(pairs) >= 2:
            predicted, measured = [p for p, _ in pairs], [m for _, m in pairs]
            record["batch_tau"] = tau = kendall_tau(predicted, measured)
            head = f"aebnas: surrogate iteration {record['iteration']}: predictor {record['predictor']}"
            if tau == tau:
                self._log(f"{head} ranked its batch with τ {tau:.2f} ({len(pairs)} candidates)", record)
            else:  # a piecewise-constant predictor (trees) often proposes a batch from one plateau
                why = ("it predicted the same accuracy for all of them" if len(set(predicted)) == 1
                       else "they all measured the same accuracy")
                self._log(f"{head}: τ on its batch is undefined ({len(pairs)} candidates: {why})", record)

    def _is_live(self, key: str) -> bool:
        return any(_key(v) == key for _, v in self._live.values()) or any(_key(v) == key for _, v in self._queue)

    def _extreme(self, smallest: bool) -> np.ndarray:
        """The cheapest (or costliest) choice of every gene, as a canonical vector."""
        enc = self._encoding
        vector = []
        for g in enc.genes:
            values = [float(v) for v in g.values]
            if g.key.endswith("_pool"):       # pooling makes a branch cheaper
                values = [-v for v in values]
            pick = int(np.argmin(values) if smallest else np.argmax(values))
            vector.append(pick)
        return enc.canonical(vector)

    def _random_unseen(self, n: int, exclude: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
        taken = {tuple(int(x) for x in v) for v in exclude} | self._seen
        out: list[np.ndarray] = []
        for _ in range(100 * max(n, 1)):
            if len(out) >= n:
                break
            v = self._encoding.sample(self._rng)
            key = tuple(int(x) for x in v)
            if key not in taken:
                taken.add(key)
                out.append(v)
        return out

    def maep(self, arch: ArchConfig) -> float:
        """MAEP (%) of the nearest average MACs the thresholds can reach (module docstring, step 3)."""
        costs = self._costs.exit_costs(arch)
        low = float(costs.cumulative()[0]) if costs.num_exits else costs.static_cost
        high = costs.static_cost
        reachable = min(max(self.target_macs, min(low, high)), high)
        return 100.0 * abs(reachable - self.target_macs) / self.target_macs

    def _nsga2(self, predictor: Any, iteration: int) -> tuple[list[np.ndarray], np.ndarray]:
        """NSGA-II on (predicted error + λ·MAEP, MAEP); ``batch_size`` unseen canonical vectors spread
        along the predicted front, with their predicted accuracy."""
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.optimize import minimize

        enc, search = self._encoding, self
        cache: dict[tuple[int, ...], tuple[float, float, float]] = {}  # vector → (f1, f2, predicted accuracy)

        def objectives(X: np.ndarray) -> np.ndarray:
            keys = [tuple(int(v) for v in enc.canonical(np.rint(x).astype(np.int64))) for x in X]
            new = [k for k in dict.fromkeys(keys) if k not in cache]
            if new:  # one predictor call per generation, one cost look-up per new network
                accuracy = predictor.predict(enc.features(np.array(new)))
                for k, acc in zip(new, accuracy):
                    maep = search.maep(enc.arch(k))
                    cache[k] = (100.0 - float(acc) + search.score_lambda * maep, maep, float(acc))
            return np.array([cache[k][:2] for k in keys])

        class Space(Problem):
            def __init__(self) -> None:
                super().__init__(n_var=len(enc), n_obj=2, xl=np.zeros(len(enc)), xu=enc.sizes - 1.0, vtype=int)

            def _evaluate(self, X: np.ndarray, out: dict, *args: Any, **kwargs: Any) -> None:
                out["F"] = objectives(X)

        # The population starts from the archive's best and random canonical vectors.
        best = sorted(self._archive, key=lambda a: -a["accuracy"])[: self.population // 2]
        start = [np.array(a["vector"]) for a in best]
        start += [enc.sample(self._rng) for _ in range(self.population - len(start))]
        algorithm = NSGA2(pop_size=self.population, sampling=np.array(start, dtype=float),
                          crossover=_UniformCrossover(), mutation=_ResetMutation(enc.sizes),
                          repair=_Canonical(enc), eliminate_duplicates=True)
        minimize(Space(), algorithm, ("n_gen", self.generations), seed=self.seed + iteration, verbose=False)
        # Every vector NSGA-II evaluated, unseen ones only, by front then spread along f2.
        keys = [k for k in cache if k not in self._seen]
        if not keys:
            return self._random_unseen(self.batch_size), np.full(self.batch_size, np.nan)
        F = np.array([cache[k][:2] for k in keys])
        chosen = _spread_along_front(F, self.batch_size)
        vectors = [np.array(keys[i]) for i in chosen]
        return vectors, np.array([cache[keys[i]][2] for i in chosen])

    def _log(self, line: str, record: dict[str, Any]) -> None:
        print(line, flush=True)
        if self.log_dir:
            path = Path(self.log_dir) / LOG_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                shown = {k: v for k, v in record.items() if k not in ("measured", "predicted")}
                f.write(json.dumps(_no_nan({**shown, "message": line})) + "\n")


def _key(vector: Any) -> str:
    """A vector as a JSON-able dictionary key: '[0, 2, 1, …]'."""
    return json.dumps([int(x) for x in vector])


def _no_nan(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    return None if isinstance(value, float) and value != value else value


def _spread_along_front(F: np.ndarray, k: int) -> list[int]:
    """``k`` rows: from the best fronts, each front's rows at evenly spaced places along f2."""
    chosen: list[int] = []
    for front in non_dominated_fronts(F):
        need = k - len(chosen)
        if need <= 0:
            break
        ordered = front[np.argsort(F[front, 1], kind="stable")]
        if len(ordered) <= need:
            chosen += [int(i) for i in ordered]
        else:
            places = np.unique(np.round(np.linspace(0, len(ordered) - 1, need)).astype(int))
            chosen += [int(ordered[p]) for p in places]
    return chosen[:k]


def require_pymoo() -> None:
    """ImportError naming the extra to install when pymoo is missing."""
    try:
        import pymoo  # noqa: F401
    except ImportError:
        raise ImportError("search_alg='surrogate' runs NSGA-II with pymoo, which is not installed: "
                          "pip install 'aebnas[surrogate]' (or pip install pymoo)") from None


class _UniformCrossover:  # built lazily so that importing this module does not need pymoo
    def __new__(cls) -> Any:
        from pymoo.operators.crossover.ux import UniformCrossover
        return UniformCrossover()


class _ResetMutation:
    """Each gene is reset to a uniformly drawn value with probability 1/genes (categorical genes)."""

    def __new__(cls, sizes: np.ndarray) -> Any:
        from pymoo.core.mutation import Mutation

        class ResetMutation(Mutation):
            def _do(self, problem: Any, X: np.ndarray, *args: Any, random_state: Any = None, **kwargs: Any) -> Any:
                X = np.array(X, dtype=float)
                hit = random_state.random(X.shape) < 1.0 / X.shape[1]
                fresh = np.floor(random_state.random(X.shape) * sizes[None, :])
                X[hit] = fresh[hit]
                return X

        return ResetMutation()


class _Canonical:
    """pymoo repair: every offspring becomes the canonical vector of the network it means."""

    def __new__(cls, enc: Any) -> Any:
        from pymoo.core.repair import Repair

        class Canonical(Repair):
            def _do(self, problem: Any, X: np.ndarray, **kwargs: Any) -> np.ndarray:
                return np.array([enc.canonical(np.clip(np.rint(x), 0, enc.sizes - 1).astype(np.int64)) for x in X],
                                dtype=float)

        return Canonical()


__all__ = ["SurrogateSearch", "require_pymoo", "LOG_FILE"]
