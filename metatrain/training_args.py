"""`MetaTrainingArguments`: `TrainingArguments` plus the meta-learning options."""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

META_OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
META_OPTIMIZERS = tuple(META_OPTIMIZER_CLASSES)
# options each meta-optimizer is built with unless `meta_optimizer_kwargs` sets them (Meta-Weight-Net's weight decay;
# `adamw` keeps it too, instead of torch's 1e-2)
META_OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": {"betas": (0.9, 0.999), "weight_decay": 1e-4},
    "adamw": {"betas": (0.9, 0.999), "weight_decay": 1e-4},
    "sgd": {"momentum": 0.9, "nesterov": False, "weight_decay": 1e-4},
}
# fields that `meta_optimizer_kwargs` replaced, and the option of the meta-optimizer each one set
REMOVED_META_OPTIMIZER_FIELDS = {
    "meta_weight_decay": "weight_decay",
    "meta_momentum": "momentum",
    "meta_nesterov": "nesterov",
    "meta_adam_beta1": "betas",
    "meta_adam_beta2": "betas",
}
logger = logging.getLogger(__name__)

# EvoGrad's default perturbation and temperature under bf16/fp16: 10x the paper's sigma, 100x its temperature, so the
# expected lookahead step (K - 1) sigma^2 / (K tau) is the paper's
MIXED_PRECISION_EVOGRAD = {"sigma": 0.01, "temperature": 5.0}
META_STEP_POSITIONS = ("before", "after")
META_TRAIN_BATCHES = ("window", "micro_batch")
META_LOSS_MODES = ("train", "eval")
SUPPORTED_SETUPS = (
    "a single device (CPU or GPU), DDP over several processes or machines (`accelerate launch` with a "
    "MULTI_GPU/MULTI_CPU config, or `torchrun`), or FSDP2 with evograd, first_order or t1t2_fd (`fsdp_version: 2`), "
    "in fp32, bf16 or fp16 mixed precision (`bf16`/`fp16` or the accelerate config's `mixed_precision`; examples in "
    "recipes/accelerate_configs/)"
)


def meta_optimizer_kwargs_for(removed: dict[str, Any]) -> dict[str, Any]:
    """The `meta_optimizer_kwargs` that give what values of the removed fields (`REMOVED_META_OPTIMIZER_FIELDS`, as
    Python values or command-line strings) gave: a lone `meta_adam_beta1`/`meta_adam_beta2` keeps the other beta's
    default."""
    kwargs: dict[str, Any] = {}
    for name, value in removed.items():
        option = REMOVED_META_OPTIMIZER_FIELDS[name]
        try:
            if option == "nesterov":
                value = value.strip().lower() in ("true", "1", "yes") if isinstance(value, str) else bool(value)
            else:
                value = float(value)
        except (TypeError, ValueError):
            pass  # shown as given
        if option == "betas":
            betas = list(kwargs.get("betas", META_OPTIMIZER_DEFAULTS["adam"]["betas"]))
            betas[int(name[-1]) - 1] = value
            value = tuple(betas)
        kwargs[option] = value
    return kwargs


def _options_dict(name: str, value: dict[str, Any] | str | None, example: str) -> dict[str, Any]:
    """An options field as a dict: JSON from the command line parsed, `None` as `{}`; a `ValueError` naming the field
    and an `example` otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"`{name}={value!r}` is not valid JSON ({err}); pass e.g. '{example}'.") from err
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"`{name}` must be a dict, got {value!r}.")
    return value


def _fsdp_version(args: TrainingArguments) -> int | None:
    """The FSDP version `args` or `accelerate launch` (its environment) ask for, or `None` without FSDP."""
    if args.fsdp:
        config = args.fsdp_config
        if isinstance(config, str) and os.path.isfile(config):  # a JSON file, as transformers reads it later
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        config = config if isinstance(config, dict) else {}
        return int(config.get("version", config.get("fsdp_version", 2)))  # transformers' default; "fsdp_" prefix
    if _env_flag("ACCELERATE_USE_FSDP"):
        return int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's default
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def refuse_sharded_training(args: TrainingArguments) -> None:
    """Raises a `ValueError` naming what is supported when `args` or `accelerate launch` (its environment) ask for
    DeepSpeed, FSDP1, or FSDP2 with a meta step that cannot run on sharded weights (a second-order estimator, online
    runs, a second-order diagnostics reference)."""
    from .sharded import SHARDED_ESTIMATORS

    if bool(args.deepspeed) or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(
            "MetaTrainer does not support DeepSpeed (asked for by `deepspeed` or by the accelerate config): the meta "
            f"step runs on unsharded weights or FSDP2's shards. Supported: {SUPPORTED_SETUPS}."
        )
    version = _fsdp_version(args)
    if version is None:
        return
    if version != 2:
        raise ValueError(
            f"MetaTrainer supports FSDP version 2 only, got version {version}: set `fsdp_config={{'version': 2}}` or "
            f"`fsdp_version: 2` in the accelerate config. Supported: {SUPPORTED_SETUPS}."
        )
    estimator = getattr(args, "hypergradient", None)
    if estimator is not None and estimator not in SHARDED_ESTIMATORS:
        raise ValueError(
            f"hypergradient={estimator!r} cannot run under FSDP: it needs a second-order graph or unsharded weights. "
            f"Under FSDP choose one of {SHARDED_ESTIMATORS}, or train with DDP."
        )
    reference = getattr(args, "meta_diagnostics_reference", None)
    if getattr(args, "meta_diagnostics_steps", 0) and reference not in SHARDED_ESTIMATORS:
        raise ValueError(
            f"meta_diagnostics_reference={reference!r} cannot run under FSDP: choose one of {SHARDED_ESTIMATORS}, or "
            "set meta_diagnostics_steps=0."
        )
    if getattr(args, "meta_inner_steps", None) is not None:
        raise ValueError(
            "Online runs (`meta_inner_steps`) keep each process's own base weights, which FSDP shards across the "
            "processes: leave `meta_inner_steps` unset under FSDP, or train with DDP."
        )


@dataclass
class MetaTrainingArguments(TrainingArguments):
    """[`~transformers.TrainingArguments`] with the options of the meta step that [`MetaTrainer`] runs between
    ordinary optimizer steps. Defaults follow Meta-Weight-Net and EvoGrad (Adam at 1e-3 with weight decay 1e-4
    for the meta-parameters, one meta step per optimizer step, meta step before the base step).
    """

    hypergradient: str = field(
        default="evograd",
        metadata={"help": "Hypergradient estimator: one of `metatrain.estimators.ESTIMATORS` (evograd, t1t2, ...)."},
    )
    hypergradient_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Options of the estimator, as a dict or a JSON string, e.g. "
            '\'{"population": 2, "sigma": 0.01, "temperature": 0.05}\' for EvoGrad.'
        },
    )
    meta_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the meta-optimizer."})
    meta_optimizer: str = field(
        default="adam", metadata={"help": f"Meta-optimizer: one of {META_OPTIMIZERS} (plain torch optimizers)."}
    )
    meta_optimizer_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Other options of the meta-optimizer (keyword arguments of its torch class, e.g. `weight_decay`, "
            "`momentum`, `nesterov`, `betas`, `eps`), as a dict or a JSON string, e.g. "
            '\'{"weight_decay": 0.0, "betas": [0.9, 0.99]}\'. They update the defaults of '
            "`META_OPTIMIZER_DEFAULTS` (weight decay 1e-4 for every meta-optimizer, momentum 0.9 for `sgd`; torch's "
            "defaults otherwise)."
        },
    )
    meta_batch_size: int | None = field(
        default=None,
        metadata={"help": "Per-device meta (validation) batch size; defaults to per_device_train_batch_size."},
    )
    meta_interval: int = field(
        default=1, metadata={"help": "Run the meta step every `meta_interval` optimizer steps (1 = every step)."}
    )
    meta_inner_steps: int | None = field(
        default=None,
        metadata={
            "help": "Online meta-learning over a task distribution (HyperDistill's setting): after every "
            "`meta_inner_steps` optimizer steps an inner optimisation ends, the base weights restart from the "
            "initialisation, the base optimizer's state is cleared and the estimator resets; the meta-parameters and "
            "meta-optimizer carry on. The training set is read in order, one task per inner optimisation "
            "(`metatrain.data.TaskStream`), and each meta batch comes from the current task's test examples "
            "(`TaskStream.tests()`). Under several processes each trains a task of its own and the hypergradient is "
            "averaged over them (a meta-batch of tasks). None: one run, no restarts."
        },
    )
    meta_reptile_lr: float | None = field(
        default=None,
        metadata={
            "help": "With `meta_inner_steps`, meta-learn the initialisation with Reptile: `phi <- phi - lr (phi - "
            "w_T)` at the end of each inner optimisation (the paper uses 1.0). None keeps the initial weights."
        },
    )
    meta_step_position: str | None = field(
        default=None,
        metadata={
            "help": "`before`: the meta step runs on the first micro-batch of an optimizer step, so the base update "
            "already uses the new meta-parameters (Meta-Weight-Net's order). `after`: it runs once the base "
            "gradients of the last micro-batch are computed, so the base update uses the old meta-parameters, and "
            "estimators that perturb the weights (EvoGrad, `t1t2_fd`) take a loss weighter's input from the base "
            "step's per-example losses instead of a forward pass of their own (except on a joined `window`). "
            "Both differentiate at the weights before the base update. Unset: `after` where it saves that forward "
            "pass, `before` otherwise."
        },
    )
    meta_loss_mode: str = field(
        default="train",
        metadata={
            "help": "Mode of the model in the meta loss's forward. `train`: batch norm normalizes the meta batch by "
            "its own statistics and dropout is on (Meta-Weight-Net's code). `eval`: batch norm uses the running "
            "statistics of training and dropout is off (LFT's code: the pseudo-unseen episode is scored as a test "
            "episode is, so its shift of feature statistics from the training domains shows). The meta step's "
            "training losses always run in training mode."
        },
    )
    meta_disjoint_key: str | None = field(
        default=None,
        metadata={
            "help": "Batch key (e.g. `domain`) whose values must differ between a training batch and its meta batch: "
            "meta batches are drawn until one shares no value with the training batch (LFT's pseudo-seen and "
            "pseudo-unseen domains). The key is kept by `remove_unused_columns`."
        },
    )
    meta_disjoint_max_draws: int = field(
        default=100,
        metadata={"help": "With `meta_disjoint_key`, the most meta batches drawn for one step before an error."},
    )
    meta_nonfinite_weights_patience: int = field(
        default=3,
        metadata={
            "help": "Stop with an error after this many meta steps in a row skipped because the model's own weights "
            "are not finite (no meta step can repair them)."
        },
    )
    meta_zero_hypergradient_patience: int = field(
        default=20,
        metadata={
            "help": "Warn once the hypergradient has been exactly zero for this many meta steps in a row (the losses "
            "do not depend on the meta-parameters); 0 turns the warning off."
        },
    )
    meta_max_grad_norm: float | None = field(
        default=None, metadata={"help": "Clip the hypergradient to this global norm before the meta-optimizer step."}
    )
    meta_train_batch: str = field(
        default="window",
        metadata={
            "help": "Training batch of the meta step under gradient accumulation. `window`: every micro-batch of the "
            "optimizer step joined, so accumulation gives the meta step of the equivalent larger batch (the meta "
            "step then holds that batch in memory). `micro_batch`: the micro-batch the meta step runs beside (the "
            "first for `before`, the last for `after`). The same without accumulation."
        },
    )

    meta_diagnostics_steps: int = field(
        default=0,
        metadata={
            "help": "At meta steps whose optimizer step is a multiple of this (with `meta_interval` > 1, of both), "
            "also compute the hypergradient with `meta_diagnostics_reference` on the same batches and log the mean "
            "cosine and norm ratio of the estimator's hypergradient to it (`hypergradient_cosine_to_<reference>`; "
            "steps where either is zero or not finite have no cosine and are counted in "
            "`hypergradient_cosine_undefined_steps`). 0 turns it off. The "
            "reference costs its own meta step each time, and a random reference draws from the RNG, changing the run."
        },
    )
    meta_diagnostics_reference: str = field(
        default="t1t2",
        metadata={"help": "Stateless estimator the hypergradient is compared with when `meta_diagnostics_steps` > 0."},
    )
    meta_profile_memory: bool = field(
        default=False,
        metadata={
            "help": "Measure the memory of each meta step (CUDA peak on GPU, peak bytes saved for backward on CPU; "
            "see `metatrain.profiling.MemoryMeter`) and log its mean as `meta_step_memory_mb`."
        },
    )

    def __new__(cls, *args, **kwargs):
        # the dataclass's own `__init__` would only say "unexpected keyword argument"
        removed = {name: value for name, value in kwargs.items() if name in REMOVED_META_OPTIMIZER_FIELDS}
        if removed:
            raise TypeError(
                f"{' and '.join(removed)} {'was' if len(removed) == 1 else 'were'} removed: pass "
                f"meta_optimizer_kwargs={meta_optimizer_kwargs_for(removed)!r}"
            )
        return super().__new__(cls)

    def meta_optimizer_cls_and_kwargs(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        """The torch class of `meta_optimizer` and its keyword arguments besides the parameters: `lr` from
        `meta_learning_rate`, then `META_OPTIMIZER_DEFAULTS` updated by `meta_optimizer_kwargs`."""
        options = {**META_OPTIMIZER_DEFAULTS[self.meta_optimizer], **(self.meta_optimizer_kwargs or {})}
        return META_OPTIMIZER_CLASSES[self.meta_optimizer], {"lr": self.meta_learning_rate, **options}

    @property
    def precision(self) -> str:
        """`"bf16"`, `"fp16"` or `"no"`, from the flags or Accelerate's setting (`accelerate launch` configs, the
        `ACCELERATE_MIXED_PRECISION` variable), as Trainer resolves it."""
        if self.bf16 or self.fp16:
            return "bf16" if self.bf16 else "fp16"
        return str(getattr(self, "mixed_precision", None) or "no")

    def estimator_options(self) -> dict[str, Any]:
        """`hypergradient_kwargs`, with EvoGrad's perturbations sized for mixed precision: bf16 and fp16 do not resolve
        `sigma=0.001` on weights of order 0.1-1, so its perturbed losses differ by rounding. Unless `sigma` or
        `temperature` is given, it then takes `MIXED_PRECISION_EVOGRAD` (the same expected lookahead step,
        `(K - 1) sigma^2 / (K tau)`); a given `sigma` below it is warned about."""
        options = dict(self.hypergradient_kwargs)
        precision = self.precision
        if self.hypergradient != "evograd" or precision not in ("bf16", "fp16"):
            return options
        if "sigma" not in options and "temperature" not in options:
            logger.warning(
                f"EvoGrad under {precision}: sigma={MIXED_PRECISION_EVOGRAD['sigma']}, temperature="
                f"{MIXED_PRECISION_EVOGRAD['temperature']} instead of the paper's 0.001 and 0.05 ({precision} does "
                "not resolve perturbations of 0.001; the expected step is the same). Set `sigma` or `temperature` in "
                "`hypergradient_kwargs` to choose them."
            )
            return {**options, **MIXED_PRECISION_EVOGRAD}
        sigma = options.get("sigma", 0.001)
        if isinstance(sigma, (int, float)) and sigma < MIXED_PRECISION_EVOGRAD["sigma"]:
            logger.warning(
                f"EvoGrad with sigma={sigma} under {precision}: perturbations that small are below {precision}'s "
                "resolution for most weights, so the hypergradient is mostly rounding noise. Leave `sigma` and "
                f"`temperature` unset (then {MIXED_PRECISION_EVOGRAD}, the same expected step), or set sigma >= "
                f"{MIXED_PRECISION_EVOGRAD['sigma']} with `rescale=True`."
            )
        return options

    def __post_init__(self):
        refuse_sharded_training(self)
        super().__post_init__()
        accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; CUDA alone before
        available = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
        if self.use_cpu or not available:
            self.dataloader_pin_memory = False  # pinning needs an accelerator: on CPU torch only warns, every loader

        from .estimators import ESTIMATORS

        if self.hypergradient not in ESTIMATORS:
            raise ValueError(f"Unknown `hypergradient={self.hypergradient!r}`: choose one of {sorted(ESTIMATORS)}.")
        self.hypergradient_kwargs = _options_dict("hypergradient_kwargs", self.hypergradient_kwargs, '{"sigma": 0.01}')
        if self.meta_optimizer not in META_OPTIMIZERS:
            raise ValueError(f"Unknown `meta_optimizer={self.meta_optimizer!r}`: choose one of {META_OPTIMIZERS}.")
        self._check_meta_optimizer_kwargs()
        if self.meta_step_position is not None and self.meta_step_position not in META_STEP_POSITIONS:
            raise ValueError(
                f"Unknown `meta_step_position={self.meta_step_position!r}`: choose one of {META_STEP_POSITIONS}, or "
                "leave it unset."
            )
        if self.meta_loss_mode not in META_LOSS_MODES:
            raise ValueError(f"Unknown `meta_loss_mode={self.meta_loss_mode!r}`: choose one of {META_LOSS_MODES}.")
        if self.meta_train_batch not in META_TRAIN_BATCHES:
            raise ValueError(
                f"Unknown `meta_train_batch={self.meta_train_batch!r}`: choose one of {META_TRAIN_BATCHES}."
            )
        if self.meta_diagnostics_steps < 0:
            raise ValueError(
                f"`meta_diagnostics_steps` must be >= 0 (0 turns it off), got {self.meta_diagnostics_steps}."
            )
        if self.meta_diagnostics_reference not in ESTIMATORS:
            raise ValueError(
                f"Unknown `meta_diagnostics_reference={self.meta_diagnostics_reference!r}`: choose one of "
                f"{sorted(ESTIMATORS)}."
            )
        if self.meta_nonfinite_weights_patience < 1:
            raise ValueError(
                f"`meta_nonfinite_weights_patience` must be >= 1, got {self.meta_nonfinite_weights_patience}."
            )
        if self.meta_zero_hypergradient_patience < 0:
            raise ValueError(
                f"`meta_zero_hypergradient_patience` must be >= 0 (0 turns the warning off), got "
                f"{self.meta_zero_hypergradient_patience}."
            )
        if self.meta_disjoint_max_draws < 1:
            raise ValueError(f"`meta_disjoint_max_draws` must be >= 1, got {self.meta_disjoint_max_draws}.")
        if self.meta_interval < 1:
            raise ValueError(f"`meta_interval` must be >= 1, got {self.meta_interval}.")
        if self.meta_learning_rate < 0:
            raise ValueError(f"`meta_learning_rate` must be >= 0, got {self.meta_learning_rate}.")
        if self.meta_max_grad_norm is not None and not self.meta_max_grad_norm > 0:
            raise ValueError(
                f"`meta_max_grad_norm` must be > 0 (a global norm to clip the hypergradient to) or None for no "
                f"clipping, got {self.meta_max_grad_norm}."
            )
        if self.meta_batch_size is not None and self.meta_batch_size < 1:
            raise ValueError(f"`meta_batch_size` must be >= 1 or None, got {self.meta_batch_size}.")
        if self.meta_inner_steps is not None and (
            isinstance(self.meta_inner_steps, bool) or not isinstance(self.meta_inner_steps, int)
            or self.meta_inner_steps < 1
        ):  # fmt: skip
            raise ValueError(f"`meta_inner_steps` must be an integer >= 1 or None, got {self.meta_inner_steps!r}.")
        if self.meta_reptile_lr is not None:
            if self.meta_inner_steps is None:
                raise ValueError(
                    f"meta_reptile_lr={self.meta_reptile_lr} learns the initialisation the base weights restart from, "
                    "but they never restart: set `meta_inner_steps` too, or leave `meta_reptile_lr` unset."
                )
            if not 0 < self.meta_reptile_lr <= 1:
                raise ValueError(f"`meta_reptile_lr` must be in (0, 1], got {self.meta_reptile_lr}.")

    def _check_meta_optimizer_kwargs(self) -> None:
        """Parses a JSON `meta_optimizer_kwargs` and checks its keys against the signature of the torch class of
        `meta_optimizer` (lists become tuples, as torch's `betas`)."""
        self.meta_optimizer_kwargs = _options_dict(
            "meta_optimizer_kwargs", self.meta_optimizer_kwargs, '{"weight_decay": 0.0}'
        )
        cls = META_OPTIMIZER_CLASSES[self.meta_optimizer]
        accepted = sorted(
            name
            for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if name not in ("self", "params", "lr")
            and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        )
        for key in self.meta_optimizer_kwargs:
            if key == "lr":
                raise ValueError(
                    "`meta_optimizer_kwargs` sets `lr`: give the meta-optimizer's learning rate as "
                    "`meta_learning_rate`."
                )
            if key not in accepted:
                raise ValueError(
                    f"Unknown option {key!r} in `meta_optimizer_kwargs` for `meta_optimizer={self.meta_optimizer!r}` "
                    f"(torch.optim.{cls.__name__}): accepted are {accepted}."
                )
        self.meta_optimizer_kwargs = {
            key: tuple(value) if isinstance(value, list) else value
            for key, value in self.meta_optimizer_kwargs.items()
        }
