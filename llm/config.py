"""Training configuration: one dataclass, read from YAML and ``key=value`` overrides.

Values are layered as defaults <- YAML file <- command-line overrides, type-checked against the
dataclass annotations and validated, so a typo or a nonsensical value fails before any model
is loaded::

    config = load_config(bundled_config_path("smoke"), ["lr=3e-4", "method=chi2-rebel"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from drosim.llm.data import read_text
from drosim.llm.methods import METHODS, Method, make_method
from drosim.llm.objective import ROBUST_SCOPES
from drosim.llm.rollout_engines import DTYPES as ROLLOUT_DTYPES
from drosim.llm.rollout_engines import ENGINES
from drosim.llm.sharding import SHARDINGS
from drosim.llm.update import W_GRADIENTS

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
CONFIGS_DIR = Path(__file__).parent / "configs"


@dataclass
class TrainConfig:
    """Everything that defines a training run; see ``llm/configs/*.yaml`` for examples.

    The world (policy, prompts, reward model, mixtures) has no default: a run names it, e.g.
    ``model: demo`` and the rest of ``llm/configs/demo.yaml`` for the built-in tiny world.
    """

    # policy / data (required)
    model: str | None = None  # "demo" (the built-in tiny world) or a local path / hub name
    tokenizer: str | None = None  # None: the same as `model`
    # "demo", a .txt (one prompt per line), a .parquet / .jsonl / .json / .csv file, a
    # save_to_disk folder or a hub dataset name
    prompts: str | None = None
    eval_prompts: str | None = None  # held-out prompts, as `prompts`
    # the prompts' column (strings, chat message lists or HH transcripts); None: "prompt",
    # else the only text column
    prompt_field: str | None = None
    prompt_split: str = "train"  # the split of a hub dataset or a saved DatasetDict
    eval_prompt_split: str | None = None  # eval_prompts' split; None: prompt_split
    # keep the last max_prompt_tokens tokens of a longer (rendered) prompt; None: no cut
    max_prompt_tokens: int | None = None
    # render prompts with the tokenizer's chat template: None when it has one, true (required),
    # false (never)
    chat_template: bool | None = None
    reward: str | None = None  # "demo" (rule-based word lists) or a HF sequence classifier
    # run the custom code (config.json `auto_map`) of the policy and the reward model; a
    # folder with such code is refused without it, before any of it is imported
    trust_remote_code: bool = False
    # the reward model's output attribute holding the scores: "logits", or e.g. "rewards"
    # (ArmoRM's objective heads) or "score"
    reward_output: str = "logits"
    # objective name -> head index or id2label name; None: every head the config's id2label
    # names
    reward_heads: dict[str, int | str] | None = None
    # objective -> [shift, scale]: the reward model's score r_j is used as (r_j - shift) /
    # scale, a fixed affine map (e.g. ArmoRM's heads to a common scale); None: raw scores
    reward_normalization: dict[str, list[float]] | None = None
    # the reward model's input tokens, at most its positions (longer inputs lose their first
    # tokens, counted and warned); None: the model's own limit
    reward_max_length: int | None = 1024
    # weights: the policy's (and the DPO reference's) "float32" or "bfloat16" (then the
    # optimiser state is bf16 too); the reward model's "auto" (bf16 on CUDA), "float32" or
    # "bfloat16"
    dtype: str = "float32"
    reward_dtype: str = "auto"
    # transformers' attention kernel of the policy ("sdpa", "eager", "flash_attention_2",
    # ...); None: transformers' default (the reward model always gets the default)
    attn_implementation: str | None = None
    train_mixture: dict[str, float] = field(default_factory=dict)  # objective -> weight
    eval_mixtures: list[dict[str, float]] = field(default_factory=list)
    # heterogeneous annotators: each iteration round(minority_fraction * pairs_per_iteration)
    # pairs, drawn at random (dealt over the ranks as evenly as integers allow), are scored
    # under minority_mixture instead of train_mixture (None / 0: none)
    minority_mixture: dict[str, float] | None = None
    minority_fraction: float = 0.0
    # method
    method: str = "rebel"  # one of METHODS
    eta: float = 0.1  # REBEL step size
    beta: float = 0.1  # DPO / IPO
    # the radii of the chi2-* and kl-rebel balls; null: 0.01 (DEFAULT_RADIUS), or the ball
    # protect_fraction sets
    chi2_rho: float | None = None
    kl_rho: float | None = None
    # f in (0, 1]: the ball's radius is the smallest that holds every reweighting onto a
    # subpopulation of mass f (Chi2.protecting(f): rho = (1/f - 1) / 2; KL.protecting(f):
    # rho = log(1/f)); chi2-* and kl-rebel only, not with their own chi2_rho / kl_rho
    protect_fraction: float | None = None
    # the ambiguity set's support: "minibatch" (each optimiser step's pairs) or "iteration"
    # (all of the iteration's pairs, each step weighting its pairs by that worst case; the
    # methods with pair weights only: chi2-*, kl-rebel, kltemp-rebel, kl-dpo)
    robust_scope: str = "minibatch"
    kl_tau: float = 0.1
    w_rho: float = 0.01
    w_p: float = 2.0
    # the Wasserstein penalty's gradient: "finite-difference" (of two first-order gradients)
    # or "exact" (a double backward, for verification)
    w_gradient: str = "finite-difference"
    # loop
    iterations: int = 30
    pairs_per_iteration: int = 32  # prompts per iteration (two responses each), over all ranks
    epochs: int = 2  # passes over each iteration's pairs
    minibatch_size: int = 16  # pairs per optimiser step, over all ranks
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # .inf: no clipping
    warmup_iterations: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 12
    # what samples the training pairs: "hf" (transformers' generate on the policy) or "vllm"
    # (a vLLM engine on the same GPU, its weights synced every iteration; CUDA only,
    # pip install 'drosim[vllm]'); evaluation always uses "hf"
    rollout_engine: str = "hf"
    # the sampling precision: "auto" (bfloat16 on CUDA, float32 on CPU), "float32" or
    # "bfloat16"; pi_t's log-probabilities are recomputed by the update whatever it is
    rollout_dtype: str = "auto"
    # extra token ids that end a response as EOS does (counted in it), e.g. an end-of-turn id
    stop_token_ids: list[int] | None = None
    # the fraction of the GPU's memory the vLLM engine may take (weights and KV cache)
    vllm_gpu_memory_utilization: float = 0.3
    eval_every: int = 5
    num_eval_prompts: int = 64
    checkpoint_every: int = 10
    seed: int = 0
    device: str = "auto"  # one of DEVICES
    bf16: bool = False
    gradient_checkpointing: bool = False
    # torch.compile the update's forward and backward (not sampling); not with the
    # Wasserstein methods (their input-embedding hook is added per step)
    compile: bool = False
    sharding: str = "none"  # one of SHARDINGS: "fsdp2" shards weights, gradients, optimiser
    # LoRA (PEFT): train rank-`lora_rank` adapters on frozen weights; None: full fine-tuning.
    # The DPO-type methods' reference is then the policy with its adapter disabled.
    lora_rank: int | None = None
    lora_alpha: float = 16.0  # an adapter adds (lora_alpha / lora_rank) B A x
    # dropout on the adapters' input, for the DPO-type methods without a Wasserstein set only
    # (REBEL's pi_t and the Wasserstein finite difference need the same network every forward)
    lora_dropout: float = 0.0
    # the modules to adapt (names or suffixes, or [all-linear]); None: PEFT's default for the
    # architecture (Llama: q_proj, v_proj), else every linear layer but the output head
    lora_target_modules: list[str] | None = None
    tensorboard: bool = False
    progress: bool = True
    out_dir: str = "runs/default"


# Resolved once: with `from __future__ import annotations` the field types are strings.
_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)


# ------------------------------------------------------------------------------------ loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Build a validated config from the defaults, a YAML file and ``key=value`` overrides.

    Later sources win: defaults <- YAML file <- overrides. Override values are parsed as YAML,
    so ``lr=3e-4``, ``bf16=true``, ``tokenizer=null`` and ``train_mixture={joy: 0.7, calm: 0.3}``
    all work.

    Args:
        path: a YAML mapping of field names to values, or ``None`` for the defaults alone.
        overrides: ``key=value`` strings, applied in order.

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
    for key in values:
        _check_known(key, where=str(path))
    return values


def _parse_override(override: str) -> tuple[str, Any]:
    """Split ``key=value`` and parse the value as YAML."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {override!r} is not of the form key=value")
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
    """Reject a key that is not a TrainConfig field, suggesting the fields it resembles."""
    if key not in _FIELD_TYPES:
        raise ValueError(f"unknown config key {key!r} in {where}; "
                         f"{suggest(str(key), list(_FIELD_TYPES), plural='keys')}")


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


def validate_config(config: TrainConfig) -> None:
    """Check every field's type and range.

    Comparisons are written so that NaN fails them; every float key is checked first to be
    a number, finite but where infinity means something (:func:`_check_finite`).

    Args:
        config: the config to check.

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
            or ``eval_prompt_split``, ``max_prompt_tokens`` or ``reward_max_length`` below 1, an
            unknown ``dtype`` or ``reward_dtype``, an empty ``attn_implementation``, a
            ``reward_normalization`` entry that is not [shift, scale] with a finite shift and a
            finite scale > 0, a LoRA key out of range or not allowed (:func:`_check_lora`), an
            unknown ``rollout_engine`` or ``rollout_dtype``, a negative stop id, a
            ``vllm_gpu_memory_utilization`` outside (0, 1), ``rollout_engine=vllm`` with
            ``sharding=fsdp2`` or LoRA, a ``minority_fraction`` outside [0, 1) or too small for
            one pair per iteration, or a ``minority_mixture`` without a fraction > 0 or the
            other way round (:func:`_check_minority`), an unknown ``robust_scope`` or
            ``robust_scope=iteration`` for a method without pair weights, a ``protect_fraction``
            outside (0, 1] (NaN included), or given to a method without a ball or together with
            its ball's radius (:func:`config_method`).
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
    _require_choice(config, "w_gradient", W_GRADIENTS)
    _require_choice(config, "sharding", SHARDINGS)
    if config.device not in DEVICES:
        raise ValueError(f"unknown device {config.device!r}; valid devices: "
                         f"{', '.join(DEVICES)}")
    for name in _POSITIVE:
        _require(config, name, lambda v: v > 0, "> 0")
    for name in _NON_NEGATIVE:
        _require(config, name, lambda v: v >= 0, ">= 0")
    for name in _AT_LEAST_ONE:
        _require(config, name, lambda v: v >= 1, ">= 1")
    # A longer warmup never reaches lr: the run would end on a fraction of it.
    _require(config, "warmup_iterations", lambda v: v <= config.iterations,
             f"<= iterations ({config.iterations}): the learning rate would never reach lr")
    method = _check_method_keys(config)
    _require(config, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    _require(config, "seed", lambda v: 0 <= v < 2**32, "in [0, 2**32) (numpy's seed range)")
    _check_batch_shape(config)
    _check_prompt_keys(config)
    _check_rollout_keys(config)
    _check_reward_heads(config)
    _check_model_keys(config)
    _check_lora(config, method)
    _check_mixture("train_mixture", config.train_mixture)
    _check_minority(config)
    if not config.eval_mixtures:
        raise ValueError("eval_mixtures is empty; give at least one mixture to evaluate")
    for i, mixture in enumerate(config.eval_mixtures):
        _check_mixture(f"eval_mixtures[{i}]", mixture)


def _check_method_keys(config: TrainConfig) -> Method:
    """The run's method (:func:`config_method`), once its robust scope and what the
    Wasserstein methods cannot run with (compile, FSDP2's exact gradient) are checked."""
    method = config_method(config)
    _check_robust_scope(config, method)
    wasserstein = method.spec is not None and method.spec.needs_input_gradients
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
    _require(config, "minibatch_size", lambda v: v <= config.pairs_per_iteration,
             f"<= pairs_per_iteration ({config.pairs_per_iteration})")
    # Otherwise the last pairs of every epoch would never be trained on.
    _require(config, "minibatch_size", lambda v: config.pairs_per_iteration % v == 0,
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
    """The config's method, its radii resolved by :func:`drosim.llm.methods.make_method`.

    A radius left null is not given: ``protect_fraction`` may then set the method's ball,
    else it is ``DEFAULT_RADIUS``; a given one is exclusive with ``protect_fraction``.

    Raises:
        ValueError: as :func:`make_method` (a bad radius, a ``protect_fraction`` out of
            range, for a method without a ball, or with that ball's own radius).
    """
    return make_method(config.method, chi2_rho=config.chi2_rho, kl_rho=config.kl_rho,
                       kl_tau=config.kl_tau, w_rho=config.w_rho, w_p=config.w_p,
                       protect_fraction=config.protect_fraction)


def _check_robust_scope(config: TrainConfig, method: Method) -> None:
    """A known scope; ``iteration`` only for a method whose set weighs the pairs."""
    _require_choice(config, "robust_scope", ROBUST_SCOPES)
    if config.robust_scope == "iteration" and not method.reweights:
        raise ValueError(f"robust_scope=iteration shares worst-case pair weights over an "
                         f"iteration, and {config.method} has none (the mean, or a "
                         "Wasserstein penalty on gradient norms): use chi2-*, kl-rebel, "
                         "kltemp-rebel or kl-dpo, or robust_scope=minibatch")


def _require_choice(config: TrainConfig, name: str, choices: Sequence[str]) -> None:
    """Refuse a value of ``name`` that is not one of ``choices``."""
    _require(config, name, lambda v: v in choices, f"one of {', '.join(choices)}")


def _require(config: TrainConfig, name: str, ok: Callable[[Any], bool], requirement: str) -> None:
    value = getattr(config, name)
    if not ok(value):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")


def _check_prompt_keys(config: TrainConfig) -> None:
    """A prompt field and split are non-empty names, a prompt token budget is >= 1."""
    if config.prompt_field is not None and not config.prompt_field:
        raise ValueError("prompt_field is empty; name a column, or null to pick 'prompt' or "
                         "the only text column")
    if not config.prompt_split:
        raise ValueError("prompt_split is empty; name a split such as 'train'")
    if config.eval_prompt_split is not None and not config.eval_prompt_split:
        raise ValueError("eval_prompt_split is empty; name a split such as 'test', or null "
                         "for prompt_split")
    _require(config, "max_prompt_tokens", lambda v: v is None or v >= 1, ">= 1 or null")


def _check_rollout_keys(config: TrainConfig) -> None:
    """A known engine and dtype, token ids >= 0, a memory fraction in (0, 1), and no vLLM
    engine over a sharded policy (whose state_dict holds shards, not the weights)."""
    _require_choice(config, "rollout_engine", ENGINES)
    _require_choice(config, "rollout_dtype", ROLLOUT_DTYPES)
    if config.stop_token_ids is not None and any(i < 0 for i in config.stop_token_ids):
        raise ValueError(f"stop_token_ids must be token ids >= 0, got {config.stop_token_ids}")
    _require(config, "vllm_gpu_memory_utilization", lambda v: 0 < v < 1, "in (0, 1)")
    if config.rollout_engine == "vllm" and config.sharding == "fsdp2":
        raise ValueError("rollout_engine=vllm cannot sample for sharding=fsdp2 yet (the "
                         "engine is loaded from a whole state_dict): use rollout_engine=hf")
    if config.rollout_engine == "vllm" and config.lora_rank is not None:
        raise ValueError("rollout_engine=vllm cannot sample a LoRA policy yet (its "
                         "state_dict holds the adapters apart from the base weights vLLM "
                         "loads): use rollout_engine=hf")


def _check_reward_heads(config: TrainConfig) -> None:
    """The reward keys that can be checked without the model: the output attribute is an
    identifier, every head is an index >= 0 or a non-empty label, and the rule-based demo
    reward (which has neither) is not given them."""
    if not config.reward_output.isidentifier():
        raise ValueError(f"reward_output must be an attribute name such as 'logits' or "
                         f"'rewards', got {config.reward_output!r}")
    heads = config.reward_heads
    if heads is not None:
        if not heads:
            raise ValueError("reward_heads is empty; give objective -> head index or label, "
                             "or null for every head the model's id2label names")
        for name, head in heads.items():
            if (head < 0) if isinstance(head, int) else not head:
                raise ValueError(f"reward_heads[{name!r}] must be a head index >= 0 or an "
                                 f"id2label name, got {head!r}")
    if config.reward == "demo" and (heads is not None or config.reward_output != "logits"):
        raise ValueError("reward_output and reward_heads choose a model's output heads; the "
                         "rule-based reward=demo has none: leave them unset")


def _check_model_keys(config: TrainConfig) -> None:
    """Known weight dtypes, a reward input budget >= 1, a named attention kernel, and affine
    reward maps that keep every score finite and its order (scale > 0)."""
    _require_choice(config, "dtype", DTYPES)
    _require_choice(config, "reward_dtype", ("auto", *DTYPES))
    _require(config, "reward_max_length", lambda v: v is None or v >= 1, ">= 1 or null")
    if config.attn_implementation is not None and not config.attn_implementation:
        raise ValueError("attn_implementation is empty; name a kernel such as 'sdpa', or null "
                         "for transformers' default")
    for objective, pair in (config.reward_normalization or {}).items():
        if not (len(pair) == 2 and math.isfinite(pair[0]) and math.isfinite(pair[1])
                and pair[1] > 0):
            raise ValueError(f"reward_normalization[{objective!r}] must be [shift, scale] with "
                             f"a finite shift and a finite scale > 0, got {pair!r}")


def _check_lora(config: TrainConfig, method: Method) -> None:
    """The LoRA keys: a rank >= 1, an alpha > 0, a dropout in [0, 1) and only with a DPO-type
    method without a Wasserstein set, a non-empty target list, no adapter keys without a
    rank, and no FSDP2 sharding. (Target modules that name nothing are refused when the
    adapter is built, by :func:`drosim.llm.lora.apply_lora`.)"""
    if config.lora_rank is None:
        defaults = TrainConfig()
        changed = [name for name in ("lora_alpha", "lora_dropout", "lora_target_modules")
                   if getattr(config, name) != getattr(defaults, name)]
        if changed:
            raise ValueError(f"{', '.join(changed)} configure a LoRA adapter, but lora_rank "
                             "is null (full fine-tuning): set lora_rank, or leave them unset")
        return
    _require(config, "lora_rank", lambda v: v >= 1, ">= 1 (or null: full fine-tuning)")
    _require(config, "lora_alpha", lambda v: 0 < v < math.inf, "finite and > 0")
    _require(config, "lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)")
    if config.lora_target_modules is not None and not config.lora_target_modules:
        raise ValueError("lora_target_modules is empty; name modules to adapt, or null for "
                         "PEFT's default for the architecture")
    wasserstein = method.spec is not None and method.spec.needs_input_gradients
    if config.lora_dropout > 0 and (wasserstein or method.pointwise == "rebel"):
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


def _check_minority(config: TrainConfig) -> None:
    """A minority fraction in [0, 1) (a minority of the pairs; 1 would leave no training
    mixture) that gives at least one pair, a minority mixture exactly when the fraction is
    > 0, and a valid mixture.
    (Its objectives are checked against the reward model's with the training mixture's.)"""
    _require(config, "minority_fraction", lambda v: 0 <= v < 1, "in [0, 1)")
    if (config.minority_mixture is None) != (config.minority_fraction == 0):
        raise ValueError("minority_mixture and minority_fraction go together: a mixture with "
                         f"a fraction > 0, or neither (got minority_mixture="
                         f"{config.minority_mixture}, minority_fraction="
                         f"{config.minority_fraction})")
    if config.minority_mixture is not None:
        _check_mixture("minority_mixture", config.minority_mixture)
        # a minority that never scores a pair would pass silently for one that does
        _require(config, "minority_fraction",
                 lambda v: round(v * config.pairs_per_iteration) >= 1,
                 f"large enough for at least one of the {config.pairs_per_iteration} pairs "
                 "per iteration (round(minority_fraction * pairs_per_iteration) >= 1)")


def _check_mixture(name: str, mixture: dict[str, float]) -> None:
    """A mixture weighs objectives: finite, non-negative weights with a positive sum."""
    for objective, weight in mixture.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{name}: the weight of {objective!r} must be finite and >= 0, "
                             f"got {weight!r}")
    if not sum(mixture.values()) > 0:
        raise ValueError(f"{name}: the weights must sum to a positive number, got {mixture}")


# ------------------------------------------------------------------------------ saving / files


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars (JSON- and YAML-serialisable), a copy."""
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the config as YAML that :func:`load_config` reads back to an equal config.

    Args:
        config: the config to write.
        path: the YAML file to (over)write; its directory must exist.
    """
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)


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
