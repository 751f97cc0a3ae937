"""The sweep file: a merge config whose parameters may be search spaces, plus a ``sweep:`` section.

```yaml
base_model: base/
models:
  - {model: expert_0, name: math, parameters: {weight: {uniform: [0.5, 1.5]}}}
  - expert_1
method: ties
parameters:
  lambda: {grid: [0.5, 1.0, 1.5]}
  density: {grid: [0.2, 0.5]}
sweep:
  tasks:                     # built-in: perplexity (nll) | classification (accuracy); or any task of
    - {name: val, type: perplexity, data: val.jsonl}          # distmerge.evaluate with type: eval
    - {name: gsm8k, type: eval, task: gsm8k, data: gsm8k_val.jsonl, limit: 200}
    # a method with one model per task (EMR) scores each task on its expert's model: {..., expert: math}
  metric: val/nll            # default: the first task's main metric; mode follows the metric (nll: min)
  search: grid               # grid | random | optuna
  num_samples: 1             # grid: repeats of the whole grid; random, optuna: trials
  scheduler: asha            # none | asha | {name: asha, grace_period: 1, reduction_factor: 2}
  eval_chunks: 4             # evaluation in this many parts, one report after each (what ASHA stops on)
```

A search space is a mapping with one key: ``grid`` (every value is tried), ``choice``, ``uniform``,
``quniform``, ``loguniform`` or ``randint``. A bare list keeps its merge-config meaning (a gradient over
layers). Spaces may stand for method parameters (``parameters.X``) and per-model parameters
(``models[i].parameters.X`` or the inline ``models[i].X``); in results they are named ``X`` and
``<model name>.X``. Everything is checked here, before any Ray work: every value a space can take at its
ends is run through the merge config's own validation.

A Twin-Merging sweep is a ``twin.yaml`` (``shared:``, ``exclusive:``, ``router:``) with the same ``sweep:`` section;
its spaces stand for the shared merge's parameters (``shared.parameters.X``, ``models[i].parameters.X``: one twin
build per combination, so only ``grid`` and ``choice``) and the exclusive parts' rank (``exclusive.rank``: ``grid``,
``choice`` or ``randint``, read from the build at the largest rank; ``distmerge.sweep.twin``):

```yaml
shared: {method: task_arithmetic, parameters: {lambda: {grid: [0.2, 0.3, 0.5]}}}
exclusive: {rank: {grid: [4, 8, 16]}, svd: exact}
router: {data: {math: math_train.jsonl, code: code_train.jsonl}}
sweep: {tasks: [{name: val, type: perplexity, data: val.jsonl}], build_workers: 4}   # Ray workers per build
```
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge import validate
from distmerge.config import MergeConfig, default_name, load_config, read_yaml
from distmerge.errors import ConfigError
from distmerge.sweep.tasks import TaskSpec, load_tasks

SPACE_KINDS = ("grid", "choice", "uniform", "quniform", "loguniform", "randint")
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("none", "asha")
SWEEP_KEYS = {"tasks", "metric", "mode", "search", "num_samples", "seed", "scheduler", "eval_chunks",
              "max_concurrent_trials", "resources_per_trial", "holders", "holder_cpus", "build_workers"}
LOWER_IS_BETTER = ("nll", "perplexity", "loss")
TWIN_SECTIONS = ("shared", "exclusive", "router")  # a sweep file with any of them is a Twin-Merging sweep
TWIN_BUILD_KINDS = ("grid", "choice")  # a shared-merge value needs a twin build of its own: a finite list
TWIN_RANK_KINDS = ("grid", "choice", "randint")


@dataclass(frozen=True)
class Space:
    """One searched parameter: where it sits in the merge config and what values it takes."""

    name: str  # as shown in results: 'lambda', 'math.weight'
    path: tuple  # into the normalized merge dict: ('parameters', 'lambda') or ('models', 0, 'parameters', 'weight')
    kind: str
    args: tuple
    label: str | None = None  # where the space sits in the user's file, if not where ``path`` says

    @property
    def where(self) -> str:
        if self.label is not None:
            return self.label
        if self.path[0] == "parameters":
            return f"parameters.{self.path[1]}"
        return f"models[{self.path[1]}].parameters.{self.path[3]}"

    def corners(self) -> list[Any]:
        """The values that bound what the space can produce: checked against the merge's validation."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def tune_domain(self):
        from ray import tune

        lo_hi = self.args[:2]
        return {
            "grid": lambda: tune.grid_search(list(self.args)),
            "choice": lambda: tune.choice(list(self.args)),
            "uniform": lambda: tune.uniform(*lo_hi),
            "quniform": lambda: tune.quniform(*self.args),
            "loguniform": lambda: tune.loguniform(*lo_hi),
            "randint": lambda: tune.randint(*lo_hi),
        }[self.kind]()


@dataclass(frozen=True)
class SweepSpec:
    merge: dict[str, Any]  # normalized merge config with spaces in place
    spaces: tuple[Space, ...]
    tasks: tuple[TaskSpec, ...]
    metric: str
    mode: str  # min | max
    search: str
    num_samples: int
    seed: int
    scheduler: str
    grace_period: int
    reduction_factor: float
    eval_chunks: int
    max_concurrent_trials: int | None
    resources_per_trial: dict[str, float]
    holders: int
    holder_cpus: float
    twin: dict[str, Any] | None = None  # a Twin sweep: its exclusive and router sections (spaces in place)
    build_workers: int | None = None  # a Twin sweep: Ray workers of each twin build (None: the cluster's CPUs)

    @property
    def is_twin(self) -> bool:
        return self.twin is not None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.spaces)

    def trial_config(self, values: dict[str, Any]):
        """The merge config of one trial (a ``TwinConfig`` for a Twin sweep): every space replaced by its value."""
        if self.is_twin:
            from distmerge.twin.config import load_twin_config

            return load_twin_config(self.trial_dict(values))
        return load_config(self.trial_dict(values))

    def trial_dict(self, values: dict[str, Any]) -> dict[str, Any]:
        merged = copy.deepcopy(self.merge)
        twin = copy.deepcopy(self.twin)
        for space in self.spaces:
            if space.name not in values:
                raise ConfigError(f"sweep: no value for searched parameter '{space.name}'")
            _set_path(twin if space.path[0] in TWIN_SECTIONS else merged, space.path, plain_value(values[space.name]))
        if twin is None:
            return merged
        shared = {"method": merged.pop("method"), "parameters": merged.pop("parameters", None) or {}}
        return {**merged, "shared": shared, **twin}

    def best_dict(self, values: dict[str, Any]) -> dict[str, Any]:
        """What best.yaml holds: the resolved merge config, or for a Twin sweep the twin.yaml of that trial."""
        if self.is_twin:
            config = self.trial_dict(values)
            oversample = self.best_oversample(values)
            if oversample is not None:
                config["exclusive"]["oversample"] = oversample
            return config
        return self.trial_config(values).to_yaml_dict()

    def best_oversample(self, values: dict[str, Any]) -> int | None:
        """A Twin sweep whose rank is searched with a randomized (or auto) SVD: the exclusive.oversample at which
        ``twin build`` of the trial at rank r rebuilds the factors it was scored with (the first r directions of a
        build at the largest rank R, whose sketch is R + oversample wide); None where nothing needs changing."""
        from distmerge.sweep.twin import RANK, largest_rank
        from distmerge.twin.config import ExclusiveConfig, reproducing_oversample

        largest, rank = largest_rank(self), values.get(RANK)
        exclusive = self.twin.get("exclusive") or {}
        if largest is None or exclusive.get("svd", ExclusiveConfig.svd) == "exact" or plain_value(rank) >= largest:
            return None
        return reproducing_oversample(exclusive.get("oversample", ExclusiveConfig.oversample), largest,
                                      plain_value(rank))

    @property
    def total_trials(self) -> int:
        """Trials the search will run: every grid combination, num_samples times (Tune's variant generator)."""
        combinations = 1
        for space in self.spaces:
            if space.kind == "grid":
                combinations *= len(space.args)
        return combinations * self.num_samples

    def corner_values(self) -> dict[str, Any]:
        return {s.name: s.corners()[0] for s in self.spaces}

    def param_space(self) -> dict[str, Any]:
        return {s.name: s.tune_domain() for s in self.spaces}

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed sweep must share with the original: the merge, the search and the scoring
        (resources, holders and concurrency may change between runs)."""
        return json.loads(json.dumps({
            "merge": self.merge, "metric": self.metric, "mode": self.mode, "search": self.search,
            "num_samples": self.num_samples, "seed": self.seed, "scheduler": self.scheduler,
            "grace_period": self.grace_period, "reduction_factor": self.reduction_factor,
            "eval_chunks": self.eval_chunks, **({"twin": self.twin} if self.is_twin else {}),
            "tasks": [{"name": t.name, "type": t.type, "task": t.task, "data": t.data, "examples": len(t.examples),
                       "max_length": t.max_length, **({"expert": t.expert} if t.expert else {})} for t in self.tasks],
        }, default=str))


def plain_value(value: Any) -> Any:
    """Tune hands numpy scalars for sampled values; the merge config wants Python numbers."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (list, dict, str)) else value


def _set_path(target: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


# --- loading -------------------------------------------------------------------------------------


def load_sweep(source: str | Path | dict[str, Any]) -> SweepSpec:
    """Read and validate a sweep file (or an already-parsed dict); errors name the key."""
    if isinstance(source, dict):
        raw, label = copy.deepcopy(source), "sweep config"
    else:
        path = Path(source)
        label = str(path)
        raw = read_yaml(path, "sweep config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping at the top level")
    if "merge_method" in raw:
        raise ConfigError("merge_method: a sweep takes distmerge's config format (method:, parameters:), "
                          "not mergekit's")
    sweep_raw = raw.get("sweep")
    if not isinstance(sweep_raw, dict):
        raise ConfigError("sweep: missing; add a 'sweep:' section with at least 'tasks:'")
    unknown = set(sweep_raw) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"sweep.{sorted(unknown)[0]}: unknown key (allowed: {', '.join(sorted(SWEEP_KEYS))})")
    twin = None
    if any(key in raw for key in TWIN_SECTIONS):
        merge, spaces, twin = _extract_twin_spaces({k: v for k, v in raw.items() if k != "sweep"})
    else:
        merge, spaces = _extract_spaces({k: v for k, v in raw.items() if k != "sweep"})
        if not spaces and _has_parameters(load_config(merge)):
            raise ConfigError("parameters: nothing to search; give at least one parameter a search space such as "
                              "{grid: [0.5, 1.0]} or {uniform: [0.1, 0.9]}")
    tasks = load_tasks(sweep_raw.get("tasks"))
    metric, mode = _metric(sweep_raw, tasks)
    search = sweep_raw.get("search", "grid")
    if search not in SEARCHES:
        raise ConfigError(f"sweep.search: {search!r} is not one of {', '.join(SEARCHES)}")
    _check_search(search, spaces)
    num_samples = _int(sweep_raw, "num_samples", 1 if search == "grid" else 10, lo=1)
    eval_chunks = _int(sweep_raw, "eval_chunks", 1, lo=1)
    scheduler, grace, factor = _scheduler(sweep_raw.get("scheduler", "none"), eval_chunks)
    smallest = min(len(t.examples) for t in tasks)
    if eval_chunks > smallest:
        raise ConfigError(f"sweep.eval_chunks: {eval_chunks} parts but a task has only {smallest} example(s)")
    max_concurrent = sweep_raw.get("max_concurrent_trials")
    if max_concurrent is not None:
        max_concurrent = _int(sweep_raw, "max_concurrent_trials", None, lo=1)
    spec = SweepSpec(
        merge=merge, spaces=tuple(spaces), tasks=tasks, metric=metric, mode=mode, search=search,
        num_samples=num_samples, seed=_int(sweep_raw, "seed", 0, lo=0), scheduler=scheduler, grace_period=grace,
        reduction_factor=factor, eval_chunks=eval_chunks, max_concurrent_trials=max_concurrent,
        resources_per_trial=_resources(sweep_raw.get("resources_per_trial")),
        holders=_int(sweep_raw, "holders", 2, lo=1), holder_cpus=_number(sweep_raw, "holder_cpus", 0.5, lo=0.0),
        twin=twin, build_workers=_build_workers(sweep_raw, twin is not None),
    )
    if spec.is_twin:
        _check_twin(spec)
    else:
        _check_experts(spec.trial_config(spec.corner_values()), tasks)  # the merge part itself is valid
    return spec


# --- Twin-Merging sweeps --------------------------------------------------------------------------


def _extract_twin_spaces(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Space], dict[str, Any]]:
    """A twin.yaml with spaces: the shared merge as a merge dict (its spaces found as any merge's), and the
    exclusive and router sections, paths made absolute, with ``exclusive.rank``'s space."""
    for key in ("method", "merge_method", "parameters"):
        if key in raw:
            raise ConfigError(f"{key}: a Twin sweep's shared merge goes under 'shared:' (method, parameters)")
    sections = {}
    for key in TWIN_SECTIONS:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping")
        sections[key] = copy.deepcopy(value)
    shared = sections.pop("shared")
    unknown = set(shared) - {"method", "parameters"}
    if unknown:
        raise ConfigError(f"shared.{sorted(unknown)[0]}: unknown key (allowed: method, parameters)")
    from distmerge.twin.config import DEFAULT_SHARED

    merge_raw = {k: v for k, v in raw.items() if k not in TWIN_SECTIONS}
    merge_raw["method"] = shared.get("method", DEFAULT_SHARED["method"])
    merge_raw["parameters"] = shared.get("parameters") if "parameters" in shared else DEFAULT_SHARED["parameters"]
    merge, spaces = _extract_spaces(merge_raw)
    spaces = [Space(s.name, s.path, s.kind, s.args, label=f"shared.{s.where}" if s.path[0] == "parameters"
                    else s.where) for s in spaces]
    for space in spaces:
        if space.kind not in TWIN_BUILD_KINDS:
            raise ConfigError(f"{space.where}: a Twin sweep builds the shared expert once per value of the shared "
                              f"merge, so its spaces are lists: {{grid: [...]}} or {{choice: [...]}}, not "
                              f"{{{space.kind}: ...}}")
    exclusive = sections["exclusive"]
    for key, value in exclusive.items():
        where = f"exclusive.{key}"
        if _is_space(value, where):
            if key != "rank":
                raise ConfigError(f"{where}: only exclusive.rank can be searched (one build serves every rank)")
            space = _space("rank", ("exclusive", "rank"), value, where)
            if space.kind not in TWIN_RANK_KINDS:
                raise ConfigError(f"{where}: a rank is searched with {{grid: [...]}}, {{choice: [...]}} or "
                                  f"{{randint: [low, high]}}, not {{{space.kind}: ...}}")
            spaces.append(Space(space.name, space.path, space.kind, space.args, label=where))
    router = sections["router"]
    if isinstance(router.get("data"), dict):
        router["data"] = {k: _absolute(v) if isinstance(v, str) else v for k, v in router["data"].items()}
    if isinstance(router.get("tokenizer"), str):
        router["tokenizer"] = _absolute(router["tokenizer"])
    if not spaces:
        raise ConfigError("shared.parameters: nothing to search; give the shared merge's lambda or exclusive.rank "
                          "a search space such as {grid: [0.2, 0.3, 0.5]}")
    names = [s.name for s in spaces]
    if len(set(names)) != len(names):
        raise ConfigError("sweep: two searched parameters are both named 'rank'; rename the shared merge's model "
                          "parameter")
    return merge, spaces, {"exclusive": exclusive, "router": router}


def _build_workers(sweep_raw: dict, twin: bool) -> int | None:
    if sweep_raw.get("build_workers") is None:
        return None
    if not twin:
        raise ConfigError("sweep.build_workers: only a Twin sweep builds (a twin.yaml with shared/exclusive/router); "
                          "a merge sweep's trials merge on its holders (sweep.holders)")
    return _int(sweep_raw, "build_workers", None, lo=1)


def _check_twin(spec: SweepSpec) -> None:
    """Every end value of every space through the twin config's own validation (the others at their first),
    and the tasks: a Twin model routes every example itself."""
    for i, task in enumerate(spec.tasks):
        if task.expert is not None:
            raise ConfigError(f"sweep.tasks[{i}].expert: a Twin model routes each example to its tasks' parts; "
                              "leave expert out (it is for methods with one model per task)")
    for space in spec.spaces:
        for value in space.corners():
            try:
                spec.trial_config({**spec.corner_values(), space.name: value})
            except ConfigError as exc:
                raise ConfigError(f"{space.where}: the search space allows {value!r}, which the twin config "
                                  f"rejects: {exc}") from None
    spec.trial_config(spec.corner_values()).merge.build_method()


def _has_parameters(config: MergeConfig) -> bool:
    """Whether the method has anything a sweep could search; one that has none (EMR) is scored as one trial."""
    import dataclasses

    method = config.build_method()
    return bool(dataclasses.fields(method.Params)) or bool(method.per_model_settings())


def _check_experts(config: MergeConfig, tasks: tuple[TaskSpec, ...]) -> None:
    """A method with one model per task scores each task on its expert's model: every task names one."""
    method = config.build_method()
    names = [m.name for m in config.models]
    for i, task in enumerate(tasks):
        where = f"sweep.tasks[{i}].expert"
        if not method.builds_task_models:
            if task.expert is not None:
                from distmerge.methods import METHODS

                per_task = ", ".join(sorted(n for n, cls in METHODS.items() if cls.builds_task_models))
                raise ConfigError(f"{where}: method '{config.method}' builds one model for every task; only a "
                                  f"method with one model per task ({per_task}) scores a task with an expert's model")
        elif task.expert is None:
            raise ConfigError(f"{where}: missing; method '{config.method}' builds one model per task, so each task "
                              f"names the model it is scored with (one of {', '.join(names)})")
        elif task.expert not in names:
            raise ConfigError(f"{where}: '{task.expert}' is not a model of the merge (one of {', '.join(names)})")


def _extract_spaces(merge_raw: dict[str, Any]) -> tuple[dict[str, Any], list[Space]]:
    """The merge dict normalized (model entries as mappings, local paths absolute) and its spaces."""
    merge = copy.deepcopy(merge_raw)
    spaces: list[Space] = []
    for key, value in merge.items():
        if key not in ("parameters", "models") and _is_space(value, f"{key}"):
            raise ConfigError(f"{key}: only parameters and models[i].parameters can be searched")
    for name in ("base_model",):
        if isinstance(merge.get(name), str):
            merge[name] = _absolute(merge[name])
    params = merge.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError("parameters: expected a mapping")
    for key, value in params.items():
        if _is_space(value, f"parameters.{key}"):
            spaces.append(_space(key, ("parameters", key), value, f"parameters.{key}"))
    models = merge.get("models")
    if isinstance(models, list):
        for i, entry in enumerate(models):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry:
                raise ConfigError(f"models[{i}].model: missing")
            entry = dict(entry)
            entry.setdefault("name", default_name(str(entry["model"])))
            entry["model"] = _absolute(str(entry["model"]))
            if isinstance(entry.get("lora"), str):  # a LoRA expert beside its base: a path, not a parameter
                entry["lora"] = _absolute(entry["lora"])
            per_model = dict(entry.pop("parameters", None) or {})
            for k in [k for k in entry if k not in ("model", "name", "lora")]:
                per_model[k] = entry.pop(k)  # inline per-model parameters (weight: 0.5) join parameters
            for k, v in per_model.items():
                where = f"models[{i}].parameters.{k}"
                if _is_space(v, where):
                    spaces.append(_space(f"{entry['name']}.{k}", ("models", i, "parameters", k), v, where))
            if per_model:
                entry["parameters"] = per_model
            models[i] = entry
    names = [s.name for s in spaces]
    if len(set(names)) != len(names):
        twice = sorted(n for n in names if names.count(n) > 1)[0]
        raise ConfigError(f"sweep: two searched parameters are both named {twice!r}")
    return merge, spaces


def _absolute(source: str) -> str:
    """Local paths made absolute so best.yaml works from any folder; hub ids stay as they are."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _is_space(value: Any, where: str) -> bool:
    if not isinstance(value, dict) or set(value) <= {"filter", "value"}:
        return False
    if len(value) == 1 and next(iter(value)) in SPACE_KINDS:
        return True
    raise ConfigError(f"{where}: a search space is one of {', '.join('{' + k + ': ...}' for k in SPACE_KINDS)}; "
                      f"got keys {sorted(value)}")


def _space(name: str, path: tuple, value: dict, where: str) -> Space:
    kind, args = next(iter(value.items()))
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list of values")
        for v in args:
            if isinstance(v, (dict, list)) or v is None:
                raise ConfigError(f"{where}.{kind}: values must be numbers, booleans or strings, got {v!r}")
        return Space(name, path, kind, tuple(args))
    size = 3 if kind == "quniform" else 2
    shape = "[low, high, step]" if size == 3 else "[low, high]"
    if not isinstance(args, list) or len(args) != size or not all(_is_number(a) for a in args):
        raise ConfigError(f"{where}.{kind}: expected {shape} numbers, got {args!r}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise ConfigError(f"{where}.{kind}: low {lo} must be below high {hi}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}.loguniform: low must be > 0, got {lo}")
    if kind == "quniform" and args[2] <= 0:
        raise ConfigError(f"{where}.quniform: step must be > 0, got {args[2]}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}.randint: expected integer [low, high) bounds, got {args!r}")
    return Space(name, path, kind, tuple(args))


def _is_number(value: Any) -> bool:
    return validate.is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _check_search(search: str, spaces: list[Space]) -> None:
    if search == "grid":
        sampled = [s for s in spaces if s.kind != "grid"]
        if sampled:
            raise ConfigError(f"sweep.search: 'grid' tries listed values only, but {sampled[0].where} is "
                              f"{{{sampled[0].kind}: ...}}; use search: random or optuna, or a {{grid: [...]}}")
    if search == "optuna":
        gridded = [s for s in spaces if s.kind == "grid"]
        if gridded:
            raise ConfigError(f"sweep.search: 'optuna' cannot take a grid ({gridded[0].where}); "
                              "use {choice: [...]} for a categorical parameter")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("sweep.search: 'optuna' needs the optuna package, which is not installed "
                              "(pip install optuna); or use search: random") from None


def _metric(sweep_raw: dict, tasks: tuple[TaskSpec, ...]) -> tuple[str, str]:
    known = [m for t in tasks for m in t.metrics]
    metric = sweep_raw.get("metric", tasks[0].metrics[0])
    if not isinstance(metric, str) or not any(t.reports(metric) for t in tasks):
        raise ConfigError(f"sweep.metric: {metric!r} is not reported by the tasks (one of {', '.join(known)})")
    default_mode = "min" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "max"
    mode = sweep_raw.get("mode", default_mode)
    if mode not in ("min", "max"):
        raise ConfigError(f"sweep.mode: {mode!r} is not min or max")
    return metric, mode


def _scheduler(value: Any, eval_chunks: int) -> tuple[str, int, float]:
    options: dict[str, Any] = {}
    if isinstance(value, dict):
        options = dict(value)
        value = options.pop("name", None)
        unknown = set(options) - {"grace_period", "reduction_factor"}
        if unknown:
            raise ConfigError(f"sweep.scheduler.{sorted(unknown)[0]}: unknown key (allowed: name, grace_period, "
                              "reduction_factor)")
    if value is None or value is False:
        value = "none"
    if value not in SCHEDULERS:
        raise ConfigError(f"sweep.scheduler: {value!r} is not one of {', '.join(SCHEDULERS)}")
    grace = _int(options, "grace_period", 1, lo=1, prefix="sweep.scheduler.")
    factor = _number(options, "reduction_factor", 2.0, lo=1.0, prefix="sweep.scheduler.")
    if value == "asha":
        if eval_chunks < 2:
            raise ConfigError("sweep.scheduler: asha stops trials between evaluation reports; set "
                              "sweep.eval_chunks to 2 or more")
        if grace > eval_chunks:
            raise ConfigError(f"sweep.scheduler.grace_period: {grace} exceeds sweep.eval_chunks ({eval_chunks})")
        if factor <= 1:
            raise ConfigError("sweep.scheduler.reduction_factor: must be > 1")
    return value, grace, factor


def _resources(value: Any) -> dict[str, float]:
    if value is None:
        return {"cpu": 1.0}
    if not isinstance(value, dict) or not value:
        raise ConfigError("sweep.resources_per_trial: expected a mapping such as {cpu: 1, gpu: 0}")
    out = {}
    for key, amount in value.items():
        out[str(key)] = validate.number(f"sweep.resources_per_trial.{key}", amount, lo=0)
    out.setdefault("cpu", 1.0)
    return out


def _int(raw: dict, key: str, default: int | None, lo: int, prefix: str = "sweep.") -> int:
    return validate.number(f"{prefix}{key}", raw.get(key, default), lo=lo, integer=True)


def _number(raw: dict, key: str, default: float, lo: float, prefix: str = "sweep.") -> float:
    return validate.number(f"{prefix}{key}", raw.get(key, default), lo=lo)


