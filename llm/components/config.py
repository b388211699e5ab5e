"""Training configuration: typed sections, read from YAML and ``key=value`` overrides.

:class:`TrainConfig` is the flat composition of the sections of
:mod:`drosim.llm.components.config_sections`, where every key's type, default and doc live. Values
are layered as defaults <- YAML file <- command-line overrides, a key written flat (``lr``) or in
its section (``loop.lr``, ``loop: {lr: ...}``), type-checked against the annotations and
validated, so a typo or a nonsensical value fails before any model is loaded; parsing imports
no model or update code::

    config = load_config(bundled_config_path("smoke"), ["lr=3e-4", "algorithm.method=dpo"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from drosim.llm.components.config_sections import (
    KEY_SECTIONS,
    SECTIONS,
    AlgorithmSection,
    DataSection,
    LoopSection,
    LoraSection,
    MixtureSection,
    PolicySection,
    RewardSection,
    RolloutSection,
    SystemSection,
    require,
    require_choice,
)
from drosim.llm.components.data import read_text
from drosim.llm.components.methods import METHODS, W_GRADIENTS, Method
from drosim.llm.components.objective import ROBUST_SCOPES

# the YAML files are package data of drosim.llm, one folder above this sub-package
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class TrainConfig(SystemSection, LoraSection, RolloutSection, LoopSection, AlgorithmSection,
                  MixtureSection, RewardSection, DataSection, PolicySection):
    """Everything that defines a training run; see ``llm/configs/*.yaml`` for examples.

    The flat composition of the sections of :mod:`drosim.llm.components.config_sections` (the bases,
    listed last section first so that the fields come in ``SECTIONS`` order), which hold every
    key's type, default and documentation. The world (policy, prompts, reward model,
    mixtures) has no default: a run names it, e.g. ``model: demo`` and the rest of
    ``llm/configs/demo.yaml`` for the built-in tiny world.
    """

    def section(self, name: str) -> Any:
        """The section ``name`` of :data:`SECTIONS` (e.g. ``"loop"``), a copy of its keys.

        Raises:
            KeyError: an unknown section name.
        """
        section = SECTIONS[name]
        return section(**{f.name: getattr(self, f.name) for f in dataclasses.fields(section)})


# Resolved once: with `from __future__ import annotations` the field types are strings.
_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)


# ------------------------------------------------------------------------------------ loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Build a validated config from the defaults, a YAML file and ``key=value`` overrides.

    Later sources win: defaults <- YAML file <- overrides. Override values are parsed as YAML,
    so ``lr=3e-4``, ``bf16=true``, ``tokenizer=null`` and ``train_mixture={joy: 0.7, calm: 0.3}``
    all work. A key is named flat (``lr``) or in its section (``loop.lr=3e-4`` in an override,
    ``loop: {lr: 3e-4}`` in a file; :data:`drosim.llm.components.config_sections.SECTIONS`).

    Args:
        path: a YAML mapping of keys (or sections of keys) to values, or ``None`` for the
            defaults alone.
        overrides: ``key=value`` or ``section.key=value`` strings, applied in order.

    Returns:
        The validated :class:`TrainConfig`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for a malformed file or override, an unknown key (the message suggests
            close matches), a value of the wrong type, or a value ``validate_config`` rejects.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(Path(path)))
    for override in overrides:
        key, value = _parse_override(override)
        values[key] = value
    config = TrainConfig(**{key: _coerce(key, value, _FIELD_TYPES[key])
                            for key, value in values.items()})
    validate_config(config)
    return config


class DuplicateKeyError(ValueError):
    """A YAML mapping that names one key twice (PyYAML would keep the last silently).

    Attributes:
        key: the key.
        lines: the 1-based lines of its first and its second occurrence.
    """

    def __init__(self, key: Any, lines: tuple[int, int]):
        super().__init__(f"duplicate key {key!r} (lines {lines[0]} and {lines[1]})")
        self.key, self.lines = key, lines


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``3e-4`` as a float and refuses duplicate keys.

    YAML 1.1, which PyYAML implements, only resolves exponent floats written with a dot
    (``3.0e-4``); plain ``safe_load`` returns the string "3e-4", a trap for learning rates.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """The mapping, after checking that no scalar key appears twice in it (keys brought
        in by a merge key ``<<`` may be overridden, as YAML allows).

        Raises:
            DuplicateKeyError: naming the key and the lines of both occurrences.
        """
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # unhashable or merge keys: SafeConstructor's own checks handle them
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise DuplicateKeyError(key, (first_line[key], line))
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds, its keys checked against the fields."""
    text = read_text(path, what="config")
    try:
        values = yaml.load(text, Loader=_Loader)
    except DuplicateKeyError as err:
        raise ValueError(f"{path}: {err}: PyYAML would keep the last silently; keep one"
                         ) from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    if values is None:  # an empty file, or comments only
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got "
                         f"{type(values).__name__}")
    return _flatten(values, where=str(path))


def _flatten(values: Mapping[Any, Any], *, where: str) -> dict[str, Any]:
    """The flat keys of a file's mapping, whose entries are keys (``lr: 0.01``) or sections
    of keys (``loop: {lr: 0.01}``, :data:`SECTIONS`), the two forms mixed as needed.

    Args:
        values: the file's top-level mapping.
        where: the file, for the messages.

    Returns:
        Flat key -> value, in the file's order.

    Raises:
        ValueError: an unknown key or section, a key outside its section, a section that is
            not a mapping, or a key set twice (flat and in its section).
    """
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if name in SECTIONS:
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}: section {name!r} must be a mapping of its keys, "
                                 f"got {type(value).__name__}")
            entries = [(_section_key(name, key, where=where), item)
                       for key, item in value.items()]
        else:
            _check_known(name, where=where)
            entries = [(name, value)]
        for key, item in entries:
            if key in flat:
                raise ValueError(f"{where}: {key!r} is set twice (flat and in its section "
                                 f"{KEY_SECTIONS[key]!r}); keep one")
            flat[key] = item
    return flat


def _section_key(section: str, key: Any, *, where: str) -> str:
    """``key`` once it is known to be a key of ``section`` (the close matches suggested)."""
    keys = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in keys:
        raise ValueError(f"unknown key {key!r} of section {section!r} in {where}; "
                         f"{suggest(str(key), keys, plural=f'{section} keys')}")
    return key


def _parse_override(override: str) -> tuple[str, Any]:
    """Split ``key=value`` (or ``section.key=value``) and parse the value as YAML."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {override!r} is not of the form key=value")
    section, dot, name = key.partition(".")
    if dot and section in SECTIONS:
        key = _section_key(section, name, where=f"override {override!r}")
    elif key in SECTIONS:
        raise ValueError(f"override {override!r} names the section {key!r}: set one of its "
                         f"keys at a time, {key}.KEY=value")
    else:
        _check_known(key, where=f"override {override!r}")
    try:
        return key, yaml.load(text, Loader=_Loader)
    except DuplicateKeyError as err:
        raise ValueError(f"override {override!r}: duplicate key {err.key!r}; keep one"
                         ) from None
    except yaml.YAMLError as err:
        raise ValueError(f"override {override!r}: the value is not valid YAML: "
                         f"{_yaml_problem(err)}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: where and what (PyYAML's own text spans several lines)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(err).split())


def _check_known(key: Any, *, where: str) -> None:
    """Reject a key that is not a TrainConfig field (nor, in a file, a section), suggesting
    the keys and sections it resembles."""
    if key not in _FIELD_TYPES:
        raise ValueError(f"unknown config key {key!r} in {where}; "
                         f"{suggest(str(key), [*_FIELD_TYPES, *SECTIONS], plural='keys')}")


def suggest(name: str, choices: Sequence[str], *, plural: str) -> str:
    """The second half of an "unknown name" message: the close matches of ``name`` among
    ``choices``, else all of them.

    Args:
        name: the unknown name.
        choices: the valid names.
        plural: what they are, for the list (``"keys"``, ``"methods"``).

    Example:
        >>> suggest("rebell", ["rebel", "dpo"], plural="methods")
        "did you mean 'rebel'?"
        >>> suggest("sft", ["rebel", "dpo"], plural="methods")
        'valid methods: rebel, dpo'
    """
    close = difflib.get_close_matches(name, choices, n=3)
    if close:
        return f"did you mean {' or '.join(map(repr, close))}?"
    return f"valid {plural}: {', '.join(choices)}"


_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number",
               str: "a string", type(None): "null"}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint``, with ints widened to floats.

    Args:
        key: the field (or the path inside it, like ``train_mixture['joy']``) for messages.
        value: the value as YAML parsed it or as the dataclass holds it.
        hint: the field's resolved annotation.

    Returns:
        ``value``, with ints where floats are expected turned into floats.

    Raises:
        ValueError: if ``value`` is not of the annotated type; ``bool`` is not accepted as a
            number, nor a number as a ``bool``. A union of scalars (``int | str``) takes the
            first of its types that accepts the value.
    """
    origin = typing.get_origin(hint)
    if origin is types.UnionType:  # `X | None`, or scalars such as `int | str`
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        options = tuple(arg for arg in options if arg is not type(None))
        if len(options) == 1:  # recurse, so a nested mistake is named where it is
            return _coerce(key, value, options[0])
        for option in options:  # scalars only: the first type that accepts the value
            try:
                return _coerce(key, value, option)
            except ValueError:
                continue
        raise _type_error(key, value, " or ".join(_TYPE_NAMES[arg] for arg in options))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, value, "a mapping")
        key_type, value_type = typing.get_args(hint)
        return {_coerce(f"{key} key", k, key_type): _coerce(f"{key}[{k!r}]", v, value_type)
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(key, value, "a list")
        (item_type,) = typing.get_args(hint)
        return [_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    # bool is a subclass of int: `true` must not pass for 1, nor 1 for `true`.
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if hint is float and is_number:
        return float(value)
    if hint is int and is_number and isinstance(value, int):
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    raise _type_error(key, value, _TYPE_NAMES[hint])


def _type_error(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})")


# --------------------------------------------------------------------------------- validation

# Fields with a lower bound alone; the rest are checked one by one in validate_config.
# The radii (chi2_rho, kl_rho, kl_tau, w_rho, w_p) and protect_fraction are validated by
# make_method and their drosim.dro sets.
_REQUIRED = ("model", "prompts", "eval_prompts", "reward")
_POSITIVE = ("eta", "beta", "lr", "max_grad_norm", "temperature")
_NON_NEGATIVE = ("weight_decay", "warmup_iterations")
_AT_LEAST_ONE = ("iterations", "pairs_per_iteration", "epochs", "minibatch_size",
                 "max_new_tokens", "eval_every", "num_eval_prompts", "checkpoint_every")
# The float keys that make_method's drosim.dro sets validate: there an infinite chi2 / KL
# radius or w_p is a documented limit, and NaN is refused with the set's own message.
_METHOD_KEYS = ("chi2_rho", "kl_rho", "kl_tau", "w_rho", "w_p", "protect_fraction")
# The other float keys for which +infinity means something (max_grad_norm: no clipping).
_MAY_BE_INFINITE = ("max_grad_norm",)


def validate_config(config: TrainConfig) -> Method:
    """Check every field's type and range, and build the run's method.

    Comparisons are written so that NaN fails them; every float key is checked first to be
    a number, finite but where infinity means something (:func:`_check_finite`). Each section
    checks its own keys (its ``check_*`` method, e.g. :meth:`LoraSection.check_lora`); the
    checks that span sections are here.

    Args:
        config: the config to check.

    Returns:
        The run's :class:`~drosim.llm.components.methods.Method` (:func:`config_method`), built once
        here for the trainer to use.

    Raises:
        ValueError: naming the first offending field and what it must be: a world field (model,
            prompts, eval_prompts, reward) not set, a wrong type, a NaN float or an infinite one
            but ``max_grad_norm``, an unknown method or device, a radius its ``drosim.dro`` set
            refuses (a negative or NaN radius or tau, ``w_p`` < 1, an infinite ``w_rho``), a
            weight decay below 0, a step size, temperature, beta, learning rate or clipping norm
            not above 0, a count below 1, ``warmup_iterations`` > ``iterations``,
            ``minibatch_size`` > ``pairs_per_iteration`` or not a divisor of it, ``top_p``
            outside (0, 1], a seed outside [0, 2**32), an unknown sharding, a mixture with a
            negative or non-finite weight or weights not summing to a positive number, no eval
            mixture, ``compile`` with a Wasserstein method, ``sharding=fsdp2`` with the exact
            Wasserstein gradient, a ``reward_output`` that is not an attribute name, an empty
            ``reward_heads`` or one with a negative index or an empty label, ``reward_output`` /
            ``reward_heads`` with ``reward=demo``, an empty ``prompt_field``, ``prompt_split``
            or ``eval_prompt_split``, ``max_prompt_tokens``, ``reward_max_length`` or
            ``reward_batch_size`` below 1, an unknown ``dtype`` or ``reward_dtype``, an empty
            ``attn_implementation``, a ``reward_normalization`` entry that is not [shift, scale]
            with a finite shift and a finite scale > 0, a LoRA key out of range or not allowed,
            an unknown ``rollout_engine`` or ``rollout_dtype``, a negative stop id, a
            ``vllm_gpu_memory_utilization`` outside (0, 1), ``rollout_engine=vllm`` with
            ``sharding=fsdp2`` or LoRA, a ``minority_fraction`` outside [0, 1) or too small for
            one pair per iteration, or a ``minority_mixture`` without a fraction > 0 or the
            other way round, an unknown ``robust_scope`` or ``robust_scope=iteration`` for a
            method without pair weights, a ``protect_fraction`` outside (0, 1] (NaN included),
            or given to a method without a ball or together with its ball's radius
            (:func:`config_method`).
    """
    for f in dataclasses.fields(config):
        _coerce(f.name, getattr(config, f.name), _FIELD_TYPES[f.name])
    _check_finite(config)
    for name in _REQUIRED:
        if getattr(config, name) is None:
            raise ValueError(f"{name} is not set: every run names its policy, prompts and "
                             "reward model (see llm/configs/demo.yaml, which sets them all to "
                             "'demo', the built-in tiny world)")
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; valid methods: "
                         f"{', '.join(METHODS)}")
    require_choice(config, "w_gradient", W_GRADIENTS)
    config.check_system()
    for name in _POSITIVE:
        require(config, name, lambda v: v > 0, "> 0")
    for name in _NON_NEGATIVE:
        require(config, name, lambda v: v >= 0, ">= 0")
    for name in _AT_LEAST_ONE:
        require(config, name, lambda v: v >= 1, ">= 1")
    # A longer warmup never reaches lr: the run would end on a fraction of it.
    require(config, "warmup_iterations", lambda v: v <= config.iterations,
            f"<= iterations ({config.iterations}): the learning rate would never reach lr")
    method = _check_method_keys(config)
    require(config, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    require(config, "seed", lambda v: 0 <= v < 2**32, "in [0, 2**32) (numpy's seed range)")
    _check_batch_shape(config)
    config.check_data()
    config.check_rollout()
    _check_rollout_fits(config)
    config.check_reward_model()
    config.check_lora()
    _check_lora_fits(config, method)
    config.check_mixtures()
    _check_minority_fits(config)
    return method


def _check_method_keys(config: TrainConfig) -> Method:
    """The run's method (:func:`config_method`), once its robust scope and what the
    Wasserstein methods cannot run with (compile, FSDP2's exact gradient) are checked."""
    method = config_method(config)
    _check_robust_scope(config, method)
    wasserstein = method.needs_input_gradients
    if config.compile and wasserstein:
        raise ValueError(f"compile=true cannot run {config.method} yet: its input-embedding "
                         "hook, added per step, is not seen by a compiled graph (and the "
                         "exact gradient's double backward has none); use compile=false")
    if config.sharding == "fsdp2" and wasserstein and config.w_gradient == "exact":
        raise ValueError(f"sharding=fsdp2 cannot run {config.method} with w_gradient=exact "
                         "(a double backward through FSDP's gradient hooks): use "
                         "w_gradient=finite-difference or sharding=none")
    return method


def _check_batch_shape(config: TrainConfig) -> None:
    """minibatch_size at most pairs_per_iteration, and a divisor of it."""
    require(config, "minibatch_size", lambda v: v <= config.pairs_per_iteration,
             f"<= pairs_per_iteration ({config.pairs_per_iteration})")
    # Otherwise the last pairs of every epoch would never be trained on.
    require(config, "minibatch_size", lambda v: config.pairs_per_iteration % v == 0,
             f"a divisor of pairs_per_iteration ({config.pairs_per_iteration}; "
             f"{config.pairs_per_iteration % config.minibatch_size} pairs would be dropped "
             "every epoch)")


def _check_finite(config: TrainConfig) -> None:
    """Every float key (but the radii, see ``_METHOD_KEYS``) is a number: never NaN, and
    infinite only where +infinity means something (``_MAY_BE_INFINITE``). An infinite step size,
    temperature or learning rate would pass the range checks and fail, or silently do
    nothing, only once the run is under way."""
    for name, hint in _FIELD_TYPES.items():
        value = getattr(config, name)
        is_float = hint is float or (typing.get_origin(hint) is types.UnionType
                                     and float in typing.get_args(hint))
        if name in _METHOD_KEYS or not is_float or value is None:
            continue
        if math.isnan(value) or (math.isinf(value)
                                 and not (value > 0 and name in _MAY_BE_INFINITE)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_token_ids(config: TrainConfig, vocab_size: int) -> None:
    """Refuse ``stop_token_ids`` the tokenizer does not have; the vocabulary size is known
    only once it is loaded, so :func:`validate_config` checks the ids are >= 0 alone.

    Args:
        config: a validated config.
        vocab_size: the number of token ids of the policy's tokenizer (``len(tokenizer)``).

    Raises:
        ValueError: naming the first id >= ``vocab_size``.

    Example:
        >>> check_token_ids(TrainConfig(stop_token_ids=[2, 50256]), vocab_size=50257)
    """
    for token_id in config.stop_token_ids or ():
        if token_id >= vocab_size:
            raise ValueError(f"stop_token_ids: {token_id} is not a token id of the tokenizer "
                             f"(its ids are 0 to {vocab_size - 1}); remove it or fix it")


def config_method(config: TrainConfig) -> Method:
    """The config's method (its ``algorithm`` section), its radii resolved by
    :func:`drosim.llm.components.methods.make_method`, with its ``w_gradient``.

    A radius left null is not given: ``protect_fraction`` may then set the method's ball,
    else it is ``DEFAULT_RADIUS``; a given one is exclusive with ``protect_fraction``.

    Raises:
        ValueError: as :func:`make_method` (a bad radius, a ``protect_fraction`` out of
            range, for a method without a ball, or with that ball's own radius).
    """
    return config.build_method()


def _check_robust_scope(config: TrainConfig, method: Method) -> None:
    """A known scope; ``iteration`` only for a method whose set weighs the pairs."""
    require_choice(config, "robust_scope", ROBUST_SCOPES)
    if config.robust_scope == "iteration" and not method.reweights:
        raise ValueError(f"robust_scope=iteration shares worst-case pair weights over an "
                         f"iteration, and {config.method} has none (the mean, or a "
                         "Wasserstein penalty on gradient norms): use chi2-*, kl-rebel, "
                         "kltemp-rebel or kl-dpo, or robust_scope=minibatch")


def _check_rollout_fits(config: TrainConfig) -> None:
    """No vLLM engine over a sharded policy (whose state_dict holds shards, not the weights)
    or a LoRA one."""
    if config.rollout_engine == "vllm" and config.sharding == "fsdp2":
        raise ValueError("rollout_engine=vllm cannot sample for sharding=fsdp2 yet (the "
                         "engine is loaded from a whole state_dict): use rollout_engine=hf")
    if config.rollout_engine == "vllm" and config.lora_rank is not None:
        raise ValueError("rollout_engine=vllm cannot sample a LoRA policy yet (its "
                         "state_dict holds the adapters apart from the base weights vLLM "
                         "loads): use rollout_engine=hf")


def _check_lora_fits(config: TrainConfig, method: Method) -> None:
    """A LoRA adapter's dropout only with a DPO-type method without a Wasserstein set, and
    no FSDP2 sharding (the adapter's own keys: :meth:`LoraSection.check_lora`)."""
    if config.lora_rank is None:
        return
    if config.lora_dropout > 0 and (method.needs_input_gradients or method.pointwise == "rebel"):
        # The trainer turns every other dropout off for the same reasons (disable_dropout).
        raise ValueError(f"lora_dropout > 0 cannot run {config.method}: REBEL's first step "
                         "needs log pi_theta = log pi_t exactly, and the Wasserstein finite "
                         "difference compares two forwards of one network; dropout draws a "
                         "new sub-network each forward. Use lora_dropout=0")
    if config.sharding == "fsdp2":
        raise ValueError("sharding=fsdp2 cannot run a LoRA policy yet: the update calls the "
                         "model inside the PEFT wrapper, past the FSDP root's all-gather, and "
                         "final/ merges an unsharded copy. Use sharding=none (a LoRA "
                         "optimiser holds the adapters' state only) or lora_rank=null")


def _check_minority_fits(config: TrainConfig) -> None:
    """A minority fraction large enough for at least one pair per iteration (its own range:
    :meth:`MixtureSection.check_mixtures`)."""
    if config.minority_mixture is not None:
        # a minority that never scores a pair would pass silently for one that does
        require(config, "minority_fraction",
                lambda v: round(v * config.pairs_per_iteration) >= 1,
                f"large enough for at least one of the {config.pairs_per_iteration} pairs "
                "per iteration (round(minority_fraction * pairs_per_iteration) >= 1)")


# ------------------------------------------------------------------------------ saving / files


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars (JSON- and YAML-serialisable), a copy,
    keyed by the flat key names."""
    return dataclasses.asdict(config)


def config_to_sections(config: TrainConfig) -> dict[str, dict[str, Any]]:
    """The config's canonical form: section -> its keys -> values (a copy, as
    :func:`config_to_dict`), in the order of :data:`SECTIONS`."""
    flat = config_to_dict(config)
    return {name: {f.name: flat[f.name] for f in dataclasses.fields(section)}
            for name, section in SECTIONS.items()}


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the config's canonical form (:func:`config_to_sections`) as YAML that
    :func:`load_config` reads back to an equal config.

    Args:
        config: the config to write.
        path: the YAML file to (over)write; its directory must exist.
    """
    with open(path, "w") as f:
        yaml.safe_dump(config_to_sections(config), f, sort_keys=False)


def bundled_config_path(name: str) -> Path:
    """The path of a config shipped in ``llm/configs``, by name (``"smoke"`` -> smoke.yaml).

    Args:
        name: the file name without ``.yaml``.

    Returns:
        The path of the YAML file.

    Raises:
        ValueError: if there is no such bundled config; the message lists those there are.
    """
    available = bundled_config_names()
    if name not in available:
        raise ValueError(f"no bundled config {name!r}; available: {', '.join(available)}")
    return CONFIGS_DIR / f"{name}.yaml"


def bundled_config_names() -> list[str]:
    """The names of the configs shipped in ``llm/configs``, sorted (``"demo"``, ...)."""
    return sorted(path.stem for path in CONFIGS_DIR.glob("*.yaml"))
