"""`fastmerge merge --config`: a merge config in mergekit's language, read as mergekit 0.1.5 reads it.

Every key is type-checked; a key or value fastmerge would not honour exactly is refused in one
line, never dropped or read differently (tests/io/test_mergekit_conformance.py runs the same
configs through mergekit). What is read as mergekit does:

- `merge_method` is required; `base_model`, `models` (each `model:` with `parameters:`),
  `parameters` (shared, and defaults for the per-model `weight` and `density`), `dtype`,
  `out_dtype`; `out_path` is fastmerge's (mergekit takes the output as an argument).
- linear: the weights divided by their sum unless `normalize: false`.
- task_arithmetic: `normalize` (default false) divides the weights by their sum; `lambda` scales.
- ties: per-model `density` (default 1.0: nothing trimmed, as in mergekit), `normalize` (default
  true), `lambda`, `rescale`, `int8_mask` (only the dtype of mergekit's mask: no effect on the result).
- slerp: `t` measured from `base_model`, which must be one of the two models.
- `dtype` is the dtype every input is loaded in (rounded or widened as it is read, as mergekit
  does) and `out_dtype` the output's (default `dtype`).

- weight, density, lambda and t may be gradients (lists interpolated across the layers) and
  conditions (`- filter: self_attn` / `value: ...`), resolved per tensor as mergekit does
  (fastmerge/merging/gradients.py).

- passthrough with `slices` (one source each: `model`, `layer_range`, `parameters: {scale}`):
  fastmerge/merging/passthrough.py.

- `tokenizer_source` / `tokenizer: {source, tokens, pad_to_multiple_of}` ("base", "union" or a model folder): every
  input's embeddings and LM head re-indexed to that tokenizer's vocabulary by token string, as
  mergekit does (fastmerge/merging/vocabulary.py); `chat_template`: Jinja text or "auto" (the
  template most inputs carry), stored in the output's tokenizer_config.json; with `models:`,
  merged slices and passthrough.

- slices with any other method: each slice's sources merged layer by layer (its `parameters` over the
  shared ones, its `base_model` else the config's): fastmerge/merging/slices.py.
- a base_model also listed under models: dropped from the merged models by the methods that hold
  the base apart (BASE_APART), as mergekit does; linear and karcher merge it as one more model
  (BASE_IS_A_MODEL: mergekit ignores their base and reads it as an input).

- `modules: {default: ...}` (a single-module architecture's one module): read as the top level.
- YAML anchors and aliases (`&name`, `*name`, `<<: *name`) as mergekit reads them, bounded (MAX_CONFIG_NODES);
  a key repeated in one mapping is refused.
- `model+lora` references (a PEFT LoRA adapter folder after the model): the adapter merged in as
  each tensor is read (fastmerge/io/lora.py).
- Parameters in scopes as mergekit resolves them: a source's own, then its slice's (or module's),
  then the shared ones; a scope whose filters give a tensor no value falls through to the next.

Refused, with the reason: a model twice in one slice, several `modules` (multi-module models),
the random methods without --own-masks (fastmerge's draws are not torch's), and keys no method reads
(ignored with a warning under --allow-unknown).
"""

from __future__ import annotations

import math
import os
import re
import stat
import sys

import yaml

from ..errors import InvalidArgumentError
from ..merging.gradients import Setting, first, layer_positions
from ..merging.passthrough import Slice
from ..io.lora import split_reference
from ..merging.vocabulary import chat_template_text

MAX_CONFIG_BYTES = 2**20  # a merge config is a few hundred bytes
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "out_path",
            "tokenizer_source", "tokenizer", "chat_template", "modules")
PER_MODEL = {"linear": ("weight",), "task_arithmetic": ("weight",), "ties": ("weight", "density"),
             "slerp": (), "dare": ("weight",), "model_stock": (), "breadcrumbs": ("weight", "density", "gamma"),
             "breadcrumbs_ties": ("weight", "density", "gamma"), "nuslerp": ("weight",), "multislerp": ("weight",), "nearswap": (), "karcher": (), "sce": (), "dare_linear": ("weight", "density"),
             "dare_ties": ("weight", "density"), "della": ("weight", "density", "epsilon"),
             "della_linear": ("weight", "density", "epsilon"), "arcee_fusion": (), "ram": (), "ramplus_tl": ()}
SHARED = {"linear": ("normalize",), "task_arithmetic": ("lambda", "normalize", "int8_mask"),
          "ties": ("lambda", "normalize", "int8_mask", "rescale"), "slerp": ("t",), "dare": ("lambda", "density", "seed"),
          "model_stock": ("filter_wise",), "breadcrumbs": ("lambda", "normalize", "int8_mask", "rescale"),
          "breadcrumbs_ties": ("lambda", "normalize", "int8_mask", "rescale"),
          "nuslerp": ("nuslerp_row_wise", "nuslerp_flatten"), "multislerp": ("normalize_weights", "eps"), "nearswap": ("t",), "karcher": ("max_iter", "tol"), "sce": ("select_topk", "int8_mask"),
          "dare_linear": ("lambda", "normalize", "int8_mask", "rescale"),
          "dare_ties": ("lambda", "normalize", "int8_mask", "rescale"),
          "della": ("lambda", "normalize", "int8_mask", "rescale"),
          "della_linear": ("lambda", "normalize", "int8_mask", "rescale"), "arcee_fusion": (),
          "ram": ("epsilon",), "ramplus_tl": ("epsilon", "r", "alpha")}
TRIMMING = ("ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear")  # per-model density, mergekit's default 1.0
# methods whose base is apart from the merged models (mergekit's BasePolicy.REQUIRED, but SLERP, whose
# base is one of its two): a base also listed under models: is dropped from them, as mergekit does
BASE_APART = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
              "della_linear", "model_stock", "sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion", "nuslerp",
              "multislerp")
# methods for which mergekit's base_model is just one more model to merge
BASE_IS_A_MODEL = ("linear", "karcher")
MERGEKIT_ONLY_METHODS = ()  # every mergekit 0.1.5 method for dense checkpoints is here
# fastmerge's draws are not mergekit's: only with --own-masks
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear", "arcee_fusion")


MAX_CONFIG_NODES = 100_000  # values of a config, counted through its aliases (mergekit's run to dozens)


def _expanded_size(node, sizes: dict) -> int:
    """How many nodes `node` stands for once every alias in it is expanded (each node counted
    once per use; memoised, so linear in the document)."""
    if id(node) not in sizes:
        if isinstance(node, yaml.SequenceNode):
            sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            sizes[id(node)] = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
        else:
            sizes[id(node)] = 1
    return sizes[id(node)]


def _unshared(value):
    """A copy of a loaded config in which no two places share a list or mapping (an alias makes
    them one object: a reader that consumes keys from one would change the other)."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


class _ConfigLoader(yaml.SafeLoader):
    """safe_load with anchors and aliases (*name), as mergekit's configs may use them, bounded: a
    few nested aliases (a "billion laughs" document) expand into more nodes than memory holds, so a
    document that stands for more than MAX_CONFIG_NODES values is refused."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_CONFIG_NODES:
            raise yaml.composer.ComposerError(None, None, f"its aliases (*name) expand it to more than "
                                              f"{MAX_CONFIG_NODES} values; not a merge config", node.start_mark)
        return node

    def construct_mapping(self, node, deep=False):
        # YAML keeps the last of a repeated key: `models:` twice would merge models the reader
        # of the file never meant; refused instead
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *name`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: construct_mapping refuses it below
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears more than once "
                                                        "(duplicate keys are refused)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 1e-3 as a string: floats need a dot there. mergekit's configs are read by
# pydantic, which takes "1e-3" as a number, so they write it that way: resolve it as YAML 1.2 does.
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _load(path: str):
    try:
        # a regular file only: a FIFO or device (/dev/zero) would block or never end
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InvalidArgumentError(f"{path}: not a regular file; give the merge config as a YAML file")
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise InvalidArgumentError(f"{path}: over {MAX_CONFIG_BYTES // 2**20} MiB; not a merge config")
        return _unshared(yaml.load(raw.decode("utf-8"), Loader=_ConfigLoader))  # noqa: S506 (a SafeLoader subclass)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidArgumentError(f"{path}: cannot read the config ({str(exc)[:300]})") from None
    except RecursionError:
        raise InvalidArgumentError(f"{path}: cannot read the config (nested too deeply)") from None


_BOOL_TEXT = {**dict.fromkeys(("true", "t", "yes", "y", "on", "1"), True),
              **dict.fromkeys(("false", "f", "no", "n", "off", "0"), False)}
_NUMERIC_TEXT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _integer_text(key: str, value: str, reader) -> int:
    number = float(value)
    if not number.is_integer():
        reader.fail(f"{key} must be an integer, got {value!r}")
    return int(number)


class _Reader:
    """Typed access to one config's values, errors naming the file and the key. With
    `allow_unknown`, keys no method reads are dropped with a warning instead (mergekit ignores
    them too); what fastmerge lacks (methods, slices with several sources, tokenizer keys) is still
    refused."""

    def __init__(self, path: str, allow_unknown: bool = False) -> None:
        self.path, self.allow_unknown = path, allow_unknown

    def fail(self, message: str):
        raise InvalidArgumentError(f"{self.path}: {message}")

    def typed(self, key: str, value, kind: str):
        """`value` when it has the type `kind` ("text", "number", "integer", "bool"), or None."""
        if value is None:
            return None
        if kind == "number" and isinstance(value, (list, dict)):
            self.fail(f"{key} must be a number, got {value!r}")
        if kind in ("number", "integer") and isinstance(value, str) and _NUMERIC_TEXT.fullmatch(value.strip()):
            # mergekit's pydantic models take a quoted number ("0.5") as the number
            value = float(value) if kind == "number" else _integer_text(key, value, self)
        if kind == "bool" and isinstance(value, str) and value.strip().lower() in _BOOL_TEXT:
            value = _BOOL_TEXT[value.strip().lower()]  # and "false" / "yes" as a bool (pydantic's lax mode)
        ok = {"text": isinstance(value, str), "bool": isinstance(value, bool),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool),
              "integer": isinstance(value, int) and not isinstance(value, bool)}[kind]
        if not ok:
            name = {"text": "a text", "bool": "true or false", "number": "a number", "integer": "an integer"}[kind]
            self.fail(f"{key} must be {name}, got {value!r}")
        if kind == "number" and not math.isfinite(value):
            self.fail(f"{key} must be a finite number, got {value!r}")
        return value

    def setting(self, key: str, value) -> Setting | None:
        """A numeric parameter as mergekit writes it: a number, a gradient (a list of numbers), or
        conditions ({filter: substring, value: number or gradient}, one or a list; no filter: any)."""
        if value is None:
            return None
        conditions = value if isinstance(value, list) and value and all(isinstance(v, dict) for v in value) else (
            [value] if isinstance(value, dict) else [{"value": value}])
        parsed = []
        for i, condition in enumerate(conditions):
            where = key if len(conditions) == 1 else f"{key}[{i}]"
            unknown = sorted(set(condition) - {"value", "filter"}, key=str)
            if unknown or "value" not in condition:
                self.fail(f"{where}: a condition is {{filter: NAME_PART, value: NUMBER or [NUMBERS]}}, got {condition!r}")
            filter_ = self.typed(f"{where}.filter", condition.get("filter"), "text")
            raw = condition["value"]
            if isinstance(raw, list):
                if not raw:
                    self.fail(f"{where}: a gradient needs at least one value")
                gradient = tuple(float(self.typed(f"{where}[{j}]", v, "number")) for j, v in enumerate(raw))
                parsed.append((filter_, gradient))
            else:
                parsed.append((filter_, float(self.typed(where, raw, "number"))))
        return Setting(tuple(parsed))

    def mapping(self, key: str, value) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(f"{key} must be a mapping of names to values, got {value!r}")
        return value

    def known(self, where: str, values: dict, known: tuple, method: str) -> None:
        """A key fastmerge would not honour is refused, never dropped (mergekit means something by it)."""
        unknown = sorted(set(values) - set(known), key=str)
        if unknown:
            takes = f"it takes {', '.join(known)} there" if known else "it takes none there"
            if not self.allow_unknown:
                self.fail(f"{where}.{unknown[0]} is not supported by fastmerge for {method} ({takes}); remove it "
                          "(or pass --allow-unknown to ignore it, as mergekit does)")
            self.ignore(where, unknown, values)

    def ignore(self, where: str, keys: list, values: dict) -> None:
        print(f"fastmerge merge: warning: {self.path}: ignoring {where} keys {keys} (--allow-unknown)", file=sys.stderr)
        for key in keys:
            del values[key]


def read_config(path: str, allow_unknown: bool = False, own_masks: bool = False) -> dict:
    """The settings of the merge config at `path` (keys as SameInitOptions and the CLI name them:
    method, base, models, weights, densities, scale, density, t, seed, normalize, dtype, output)."""
    r = _Reader(path, allow_unknown)
    config = _load(path)
    if not isinstance(config, dict):
        r.fail("the config must be a mapping (merge_method, models, ...)")
    unknown = sorted(set(config) - set(TOP_KEYS), key=str)
    if unknown and not allow_unknown:
        r.fail(f"unknown keys {unknown}; known: {sorted(TOP_KEYS)} (--allow-unknown ignores them, as mergekit does)")
    if unknown:
        r.ignore("top-level", unknown, config)
    if "modules" in config:
        config = _single_module(r, config)
    method = r.typed("merge_method", config.get("merge_method"), "text")
    if method is None:
        r.fail(f"merge_method is required (as in mergekit): {', '.join(PER_MODEL)} or passthrough")
    if method in MERGEKIT_ONLY_METHODS:
        r.fail(f"merge_method {method} is a mergekit method fastmerge does not have yet; fastmerge has "
               f"{', '.join(PER_MODEL)}")
    if method in RANDOM_METHODS and not own_masks:
        r.fail(f"{method} drops entries at random: fastmerge draws its own reproducible masks, not mergekit's "
               "(torch's generator), so the merge would differ from mergekit's; pass --own-masks to run it so")
    if method == "passthrough":
        return {**_passthrough(r, config, method), **_tokenizer_settings(r, config)}
    if method not in PER_MODEL:
        r.fail(f"unknown merge_method {method!r}; choose one of {', '.join(PER_MODEL)}, passthrough")
    if "slices" in config:
        return _merged_slices(r, config, method)
    return _models_settings(r, config, method)


def _models_settings(r: _Reader, config: dict, method: str, where: str = "") -> dict:
    """The settings of a `models:` config (or of one slice of a slices config, rewritten as one:
    `where` names the slice in messages)."""
    # parameter scopes, highest precedence first: a slice's or module's own, then the shared ones
    # (mergekit falls through to the next scope when a setting gives a tensor no value)
    scopes = [r.mapping(f"{where}parameters", config.get("parameters")),
              *(r.mapping("parameters", scope) for scope in config.get(_FALLBACK, []))]
    for scope in scopes:
        r.known("parameters", scope, SHARED[method] + PER_MODEL[method], method)
    params = {k: v for scope in reversed(scopes) for k, v in scope.items()}  # single values: the highest scope's

    entries = config.get("models") or []
    if not isinstance(entries, list):
        r.fail(f"models must be a list of entries (- model: PATH), got {entries!r}")
    models, own = [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            r.fail(f"models[{i}] needs a 'model' path")
        r.known(f"models[{i}]", entry, ("model", "parameters"), method)
        if not isinstance(entry["model"], str) or not entry["model"]:
            r.fail(f"models[{i}].model must be a path, got {entry['model']!r}")
        models.append(entry["model"])
        values = r.mapping(f"models[{i}].parameters", entry.get("parameters"))
        r.known(f"models[{i}].parameters", values, PER_MODEL[method], method)
        own.append(values)

    settings = {"method": method, "models": models,
                "base": r.typed("base_model", config.get("base_model"), "text"),
                "seed": r.typed("parameters.seed", params.get("seed"), "integer"),
                "output": r.typed("out_path", config.get("out_path"), "text")}
    if method in BASE_IS_A_MODEL and settings["base"] is not None:
        # mergekit does not hold these methods' base apart (its BasePolicy.IGNORED): the base_model is
        # one more input model, with the shared parameters (once, if it is listed too)
        base, settings["base"] = settings["base"], None
        if all(os.path.realpath(m) != os.path.realpath(base) for m in models):
            if where:
                r.fail(f"{where[:-1]}: base_model {base} is one more model of a {method} merge; list it among the "
                       "slice's sources with its layer_range")
            if method == "linear" and "weight" not in params:
                r.fail(f"base_model {base} is one more model of a linear merge (mergekit reads it so) and has no "
                       "weight: list it under models with a weight, give parameters.weight, or drop base_model")
            models.append(base)
            own.append({})
    normalize = r.typed("parameters.normalize", params.get("normalize"), "bool")
    r.typed("parameters.int8_mask", params.get("int8_mask"), "bool")  # mergekit's mask dtype: same result
    ram_settings = {}
    if method in ("ram", "ramplus_tl"):  # their epsilon is a shared threshold, not della's per-model spread
        ram_settings["threshold"] = r.typed("parameters.epsilon", params.pop("epsilon", None), "number")
        ram_settings["r"] = r.typed("parameters.r", params.get("r"), "number")
        ram_settings["alpha"] = r.typed("parameters.alpha", params.get("alpha"), "number")
    numbers = ConfigParameters(
        r.path, method,
        shared={key: _chained(r.setting(f"parameters.{key}", scope.get(key)) for scope in scopes)
                if key in params else None for key in ("weight", "density", "gamma", "epsilon", "lambda", "t")},
        per_model=[{key: r.setting(f"models[{i}].parameters.{key}", v.get(key)) for key in ("weight", "density",
                                                                                          "gamma", "epsilon")}
                   for i, v in enumerate(own)],
        normalize=normalize)
    settings["normalize"] = None if method == "linear" else normalize  # linear's is applied to its weights
    settings.update(ram_settings)
    settings["filter_wise"] = r.typed("parameters.filter_wise", params.get("filter_wise"), "bool")
    settings["rescale"] = r.typed("parameters.rescale", params.get("rescale"), "bool")
    settings["row_wise"] = r.typed("parameters.nuslerp_row_wise", params.get("nuslerp_row_wise"), "bool")
    settings["flatten"] = r.typed("parameters.nuslerp_flatten", params.get("nuslerp_flatten"), "bool")
    if method == "multislerp":  # its normalize is called normalize_weights
        settings["normalize"] = r.typed("parameters.normalize_weights", params.get("normalize_weights"), "bool")
    settings.update(_dtypes(r, config))
    settings.update(_tokenizer_settings(r, config))
    if method == "slerp":
        _base_first(r, settings)
    if method == "sce":
        settings["select_topk"] = r.typed("parameters.select_topk", params.get("select_topk"), "number")
    if method == "multislerp":
        settings["eps"] = r.typed("parameters.eps", params.get("eps"), "number")
    if method == "karcher":
        settings["max_iter"] = r.typed("parameters.max_iter", params.get("max_iter"), "integer")
        settings["tol"] = r.typed("parameters.tol", params.get("tol"), "number")
    if method in BASE_APART and settings["base"] is not None:
        # a base listed among the models (with or without parameters) is not one of the merged models
        keep = [i for i, m in enumerate(models) if os.path.realpath(m) != os.path.realpath(settings["base"])]
        if len(keep) < len(models):
            settings["models"] = [models[i] for i in keep]
            numbers.per_model = [numbers.per_model[i] for i in keep]
            numbers.uniform = numbers.check_uniform()
    if method == "linear" and len(settings["models"]) == 1 and "weight" not in params and own[0].get("weight") is None:
        r.fail("a linear merge of one model needs its weight (mergekit requires one): give it a weight, or list 2 "
               "or more models")
    if numbers.uniform:
        settings.update(numbers.resolve("", 0.0))
    else:
        settings["tensor_parameters"] = numbers
    return settings


class ConfigParameters:
    """A config's numeric parameters (weight, density, lambda, t), each a value, a gradient or
    conditions, resolved per tensor as mergekit resolves them: a model's own setting first, then
    the shared one, then the method's default."""

    def __init__(self, path: str, method: str, shared: dict, per_model: list[dict], normalize: bool | None) -> None:
        self.path, self.method, self.shared, self.per_model, self.normalize = path, method, shared, per_model, normalize
        self.uniform = self.check_uniform()

    def check_uniform(self) -> bool:
        """Whether every setting is one value for every tensor (no gradient, no filter)."""
        settings = [*self.shared.values(), *(s for own in self.per_model for s in own.values())]
        return all(s is None or s.scalar is not None for s in settings)

    def _per_model(self, key: str, name: str, t: float) -> list[float] | None:
        values = [first((own[key], self.shared[key]), name, t) for own in self.per_model]
        return None if all(v is None for v in values) else values

    def resolve(self, name: str, t: float) -> dict:
        """The settings of tensor `name` at layer position `t`: weights, densities, density, scale, t."""
        r = _Reader(self.path)
        weights = self._per_model("weight", name, t)
        if weights is not None and None in weights:
            where = f" for tensor {name!r}" if name else ""
            r.fail(f"models[{weights.index(None)}] has no weight{where} (mergekit requires one for every model); add it")
        out = {"scale": first((self.shared["lambda"],), name, t), "t": first((self.shared["t"],), name, t)}
        densities = self._per_model("density", name, t)
        if self.method in TRIMMING:
            # mergekit's default density is 1.0 (nothing trimmed), not the paper's 0.2 or fastmerge's CLI 0.5
            out["densities"] = [1.0 if d is None else d for d in densities] if densities else None
            out["density"] = 1.0 if densities is None else None
        else:
            out["density"] = densities[0] if densities else None  # (per-model density: the trimming methods)
        gammas = self._per_model("gamma", name, t)
        out["gammas"] = [0.01 if g is None else g for g in gammas] if gammas else None  # mergekit's default 0.01
        epsilons = self._per_model("epsilon", name, t)
        out["epsilons"] = [0.15 if e is None else e for e in epsilons] if epsilons else None  # mergekit's 0.15
        out["weights"] = _normalized(r, weights, self.normalize) if self.method == "linear" else weights
        return out

    def tensor_settings(self, names) -> dict[str, dict]:
        """resolve() for every tensor of a checkpoint, at its position along the layers."""
        positions = layer_positions(names)
        return {name: self.resolve(name, t) for name, t in positions.items()}


def _passthrough(r: _Reader, config: dict, method: str) -> dict:
    """`merge_method: passthrough` with `slices:`, each one source {model, layer_range: [start, end],
    parameters: {scale}}: fastmerge.merging.passthrough."""
    scopes = [r.mapping("parameters", scope) for scope in (config.get("parameters"), *config.get(_FALLBACK, []))]
    for scope in scopes:
        r.known("parameters", scope, ("scale",), method)
    if (config.get("models") is None) == (config.get("slices") is None):
        r.fail("passthrough takes slices: (- sources: [{model: PATH, layer_range: [START, END]}]) or one model in "
               "models:, not both or neither")
    if config.get("models") is not None:  # one model, copied (scaled)
        models = config["models"]
        if not isinstance(models, list) or len(models) != 1:
            r.fail(f"passthrough takes one model in models: (or slices:), got {models!r}")
        entry = models[0] if isinstance(models[0], dict) else {"model": models[0]}
        r.known("models[0]", entry, ("model", "parameters"), method)
        config = {**config, "slices": [{"sources": [{"model": entry.get("model"), "layer_range": None,
                                                     "parameters": entry.get("parameters")}]}]}
    slices = []
    for where, entry in _slice_entries(r, config["slices"], ("sources",), method):
        sources = entry.get("sources")
        if not isinstance(sources, list) or len(sources) != 1:
            r.fail(f"{where}.sources: passthrough takes exactly one source per slice, got {sources!r}")
        source = sources[0]
        if not isinstance(source, dict):
            r.fail(f"{where}.sources[0] must be {{model: PATH, layer_range: [START, END]}}, got {source!r}")
        r.known(f"{where}.sources[0]", source, ("model", "layer_range", "parameters"), method)
        model = r.typed(f"{where}.sources[0].model", source.get("model"), "text")
        span = source.get("layer_range")
        whole = span is None and config.get("models") is not None  # passthrough of one model: all its layers
        if not whole and (model is None or not isinstance(span, list) or len(span) != 2
                          or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in span)
                          or span[0] >= span[1]):
            r.fail(f"{where}.sources[0] needs model: PATH and layer_range: [START, END] with 0 <= START < END, "
                   f"got {source!r}")
        if model is None:
            r.fail(f"{where}.sources[0] needs model: PATH")
        span = [0, None] if whole else span
        own = r.mapping(f"{where}.sources[0].parameters", source.get("parameters"))
        r.known(f"{where}.sources[0].parameters", own, ("scale",), method)
        slices.append(Slice(model, span[0], span[1], r.setting(f"{where}.sources[0].parameters.scale", own.get("scale"))))
    return {"method": "passthrough", "slices": slices, "base": r.typed("base_model", config.get("base_model"), "text"),
            "scale": _chained(r.setting("parameters.scale", scope.get("scale")) for scope in scopes),
            **_dtypes(r, config),
            "output": r.typed("out_path", config.get("out_path"), "text")}


def _tokenizer(r: _Reader, config: dict) -> dict | None:
    """tokenizer_source, or the tokenizer block ({source, pad_to_multiple_of}), as
    fastmerge.merging.vocabulary takes it (None: the base's tokenizer files are copied as they are)."""
    source, block = config.get("tokenizer_source"), config.get("tokenizer")
    if source is not None and block is not None:
        r.fail("tokenizer_source and tokenizer are both given; mergekit refuses that too: keep one")
    pad = None
    if block is not None:
        block = r.mapping("tokenizer", block)
        unknown = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"}, key=str)
        if unknown:
            r.fail(f"tokenizer.{unknown[0]} is not a tokenizer key (source, tokens, pad_to_multiple_of)")
        tokens = _token_sources(r, block.get("tokens"))
        source = block.get("source", "union")  # mergekit's default
        pad = r.typed("tokenizer.pad_to_multiple_of", block.get("pad_to_multiple_of"), "integer")
        if pad is not None and pad < 1:
            r.fail(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad}")
    else:
        tokens = {}
    if source is None:
        return None
    source = r.typed("tokenizer_source", source, "text")
    if source not in ("base", "union") and split_reference(source):
        source = split_reference(source)[0]  # a model+lora reference: the model's tokenizer
    return {"source": source, "pad_to_multiple_of": pad, "tokens": tokens}


def _token_sources(r: _Reader, tokens) -> dict[str, dict]:
    """tokenizer.tokens: {token: {source: MODEL | {kind: zero} | {kind: model_token, model: MODEL,
    token: T | token_id: N}, force: bool}} as fastmerge.merging.vocabulary takes it."""
    if tokens is None:
        return {}
    tokens = r.mapping("tokenizer.tokens", tokens)
    out = {}
    for token, entry in tokens.items():
        where = f"tokenizer.tokens[{token!r}]"
        entry = r.mapping(where, entry)
        unknown = sorted(set(entry) - {"source", "force"}, key=str)
        if unknown:
            r.fail(f"{where}.{unknown[0]}: a token takes source and force")
        source = entry.get("source")
        force = r.typed(f"{where}.force", entry.get("force", False), "bool")
        if isinstance(source, str):
            rule = {"kind": "model", "model": source}
        elif isinstance(source, dict) and source.get("kind") == "zero" and set(source) == {"kind"}:
            rule = {"kind": "zero"}
        elif isinstance(source, dict) and source.get("kind") == "model_token":
            if set(source) - {"kind", "model", "token", "token_id"} or ("token" in source) == ("token_id" in source):
                r.fail(f"{where}.source: model_token takes model and one of token, token_id")
            model = r.typed(f"{where}.source.model", source.get("model"), "text")
            if model is None:
                r.fail(f"{where}.source: model_token needs model")
            rule = {"kind": "model_token", "model": model,
                    "token": r.typed(f"{where}.source.token", source.get("token"), "text"),
                    "token_id": r.typed(f"{where}.source.token_id", source.get("token_id"), "integer")}
        else:
            r.fail(f"{where}.source must be a model path, {{kind: zero}} or {{kind: model_token, model, token or "
                   f"token_id}}, got {source!r}")
        out[str(token)] = {**rule, "force": bool(force)}
    return out


# a rewritten config's lower parameter scopes (a module's or slice's shared ones), highest first
_FALLBACK = "_fallback_parameters"


def _chained(settings) -> Setting | None:
    """Settings of one parameter from scopes, highest first, as one: the first scope whose setting
    gives a tensor a value decides (mergekit's order); a scope's unmatched filters fall through."""
    conditions = tuple(c for setting in settings if setting is not None for c in setting.conditions)
    return Setting(conditions) if conditions else None


def _single_module(r: _Reader, config: dict) -> dict:
    """`modules: {default: {models | slices, parameters}}`, mergekit's form for the one module of a
    single-module architecture (every decoder LLM), as the top-level config it means: the module's
    parameters over the shared ones. Several modules (vision-language models) are refused."""
    modules = r.mapping("modules", config["modules"])
    if list(modules) != ["default"]:
        r.fail(f"modules {sorted(map(str, modules))}: fastmerge merges single-module architectures, whose one module "
               "mergekit calls default (modules: {default: {models: ...}}); multi-module models are not supported")
    module = r.mapping("modules.default", modules["default"])
    unknown = sorted(set(module) - {"models", "slices", "parameters"}, key=str)
    if unknown:
        r.fail(f"modules.default.{unknown[0]}: a module takes models or slices, and parameters")
    if any(config.get(k) is not None for k in ("models", "slices")):
        r.fail("give modules:, slices: or models:, one of them (mergekit refuses more)")
    rewritten = {k: v for k, v in config.items() if k != "modules"}
    rewritten.update({k: module[k] for k in ("models", "slices") if module.get(k) is not None})
    rewritten["parameters"] = r.mapping("modules.default.parameters", module.get("parameters"))
    rewritten[_FALLBACK] = [config.get("parameters")]  # the shared ones, below the module's
    return rewritten


def _slice_entries(r: _Reader, entries, keys: tuple, method: str):
    """(where, entry) of each slice of a config, checked to be a mapping with only `keys`."""
    if not isinstance(entries, list) or not entries:
        r.fail(f"slices must be a non-empty list of {{sources: [...]}}, got {entries!r}")
    for i, entry in enumerate(entries):
        where = f"slices[{i}]"
        if not isinstance(entry, dict):
            r.fail(f"{where} must be {{sources: [...]}}, got {entry!r}")
        r.known(where, entry, keys, method)
        yield where, entry


def _merged_slices(r: _Reader, config: dict, method: str) -> dict:
    """`slices:` with a merge method: each output slice merges the same-length layer ranges of its
    sources, layer by layer (fastmerge.merging.slices). Each slice is read as a `models:` config of
    its sources (their parameters per model; the slice's parameters over the shared ones; its
    base_model, else the config's), so every method reads its parameters as it does there."""
    if config.get("models") is not None:
        r.fail("give slices: or models:, not both (mergekit refuses that too)")
    slices = []
    for where, entry in _slice_entries(r, config["slices"], ("sources", "parameters", "base_model"), method):
        sources = entry.get("sources")
        if not isinstance(sources, list) or not sources:
            r.fail(f"{where}.sources must be a non-empty list of {{model: PATH, layer_range: [START, END]}}")
        ranges = []
        for j, source in enumerate(sources):
            if not isinstance(source, dict):
                r.fail(f"{where}.sources[{j}] must be {{model: PATH, layer_range: [START, END]}}, got {source!r}")
            r.known(f"{where}.sources[{j}]", source, ("model", "layer_range", "parameters"), method)
            model = r.typed(f"{where}.sources[{j}].model", source.get("model"), "text")
            span = source.get("layer_range")
            if (model is None or not isinstance(span, list) or len(span) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in span)
                    or span[0] >= span[1]):
                r.fail(f"{where}.sources[{j}] needs model: PATH and layer_range: [START, END] with 0 <= START < END, "
                       f"got {source!r}")
            ranges.append((model, span[0], span[1]))
        if len({e - s for _, s, e in ranges}) != 1:
            r.fail(f"{where}: its sources' layer ranges differ in length {[[s, e] for _, s, e in ranges]}; every "
                   "source of a slice gives the same number of layers (as in mergekit)")
        if len({os.path.realpath(m) for m, _, _ in ranges}) != len(ranges):
            r.fail(f"{where}: a model appears twice among its sources; fastmerge merges distinct models per slice")
        own = r.mapping(f"{where}.parameters", entry.get("parameters"))
        rewritten = {"base_model": entry.get("base_model", config.get("base_model")),
                     "parameters": own, _FALLBACK: [config.get("parameters"), *config.get(_FALLBACK, [])],
                     "models": [{"model": m, "parameters": src.get("parameters")} for (m, _, _), src in
                                zip(ranges, sources)],
                     "dtype": config.get("dtype"), "out_dtype": config.get("out_dtype")}
        settings = _models_settings(r, rewritten, method, where=f"{where}.")
        # the method may reorder or drop models (slerp: the base first; nearswap: the base apart)
        span = {os.path.realpath(m): (s, e) for m, s, e in ranges}
        settings["ranges"] = [span[os.path.realpath(m)] for m in settings["models"]]
        settings["base_range"] = span.get(os.path.realpath(settings["base"])) if settings.get("base") else None
        if settings.get("base") and settings["base_range"] is None:
            r.fail(f"{where}: base_model {settings['base']} is not among the slice's sources; list it with its "
                   "layer_range")
        slices.append(settings)
    return {"method": method, "merged_slices": slices, **_dtypes(r, config),
            "output": r.typed("out_path", config.get("out_path"), "text"), **_tokenizer_settings(r, config)}


def _tokenizer_settings(r: _Reader, config: dict) -> dict:
    """{"tokenizer": ..., "chat_template": ...}; a named chat template is refused before any model
    is opened."""
    template = r.typed("chat_template", config.get("chat_template"), "text")
    if template is not None:
        try:
            chat_template_text(template, [])
        except InvalidArgumentError as exc:
            r.fail(str(exc))
    return {"tokenizer": _tokenizer(r, config), "chat_template": template}


def _dtypes(r: _Reader, config: dict) -> dict:
    """{"dtype": the output's (out_dtype, else dtype), "input_dtype": dtype}: mergekit loads every input
    in `dtype` (rounding it, or widening it) before any arithmetic, and so does fastmerge."""
    # mergekit takes "torch.bfloat16" for "bfloat16", and an empty name for none
    dtype = (r.typed("dtype", config.get("dtype"), "text") or "").removeprefix("torch.") or None
    out_dtype = (r.typed("out_dtype", config.get("out_dtype"), "text") or "").removeprefix("torch.") or None
    return {"dtype": out_dtype or dtype, "input_dtype": dtype}


def _base_first(r: _Reader, settings: dict) -> None:
    """mergekit's SLERP measures t from base_model, one of its two models: put it first (t = 0 is
    the base), and it is not a base of task vectors."""
    base = settings.pop("base")
    if base is None:
        return
    same = [i for i, m in enumerate(settings["models"]) if os.path.realpath(m) == os.path.realpath(base)]
    if not same:
        r.fail("slerp's base_model must be one of its two models (t measures the way from it to the other)")
    models = settings["models"]
    settings["models"] = [models[same[0]]] + [m for i, m in enumerate(models) if i != same[0]]


def _normalized(r: _Reader, weights: list[float] | None, normalize: bool | None) -> list[float] | None:
    """A config's linear weights as mergekit reads them: divided by their sum unless normalize: false."""
    if weights is None or normalize is False:
        return weights
    if not all(math.isfinite(w) for w in weights):
        r.fail(f"weights must be finite numbers, got {weights}")
    total = sum(weights)
    if not math.isfinite(total):
        r.fail(f"the linear weights {weights} sum past a float's range: they cannot be normalised; give smaller "
               "weights (only their ratios matter)")
    if total == 0:
        r.fail("the linear weights sum to 0: they cannot be normalised (mergekit's default); set "
               "parameters.normalize: false to use them as they are")
    return [w / total for w in weights]
