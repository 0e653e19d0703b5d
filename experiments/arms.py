"""The arms the experiments train, by name: ``base``, ``P<n>`` (ParScale with the default prefix length),
``P<n>T<t>`` (ParScale with prefix length t), ``lora`` (PEFT's LoRA on every linear layer of the decoder), each but
``base`` with an optional ``@<learning rate>`` and then an optional ``#<seed>`` (the training seed, 0 when left out:
the same arm trained again with another seed, to measure how much training alone moves a result), and ParScale arms
with P >= 2 with ``+div<λ>`` (a stream-diversity term, `stream_diversity.py`) before the rate. The HumanEval
experiment and the stream sweep name their output folders after them, and build each arm's adapter and learning rate
here, so that an arm is the same thing in both.

Example::

    from arms import arm_learning_rate, arm_peft_config, parse_arm

    arm = parse_arm("P1T192@1.5e-2")  # Arm(kind="parscale", P=1, prefix_length=192, learning_rate=0.015)
    parse_arm("lora@6e-4#2").seed  # 2
    config = arm_peft_config(arm, prefix_length=48, smoothing=0.1, lora_rank=16)  # ParScaleConfig(P=1, ...T=192)
    rate = arm_learning_rate(arm, learning_rate=5e-2, lora_learning_rate=None)  # 0.015
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peft import LoraConfig

import peft_parscale  # noqa: F401  (registers the ParScale adapter type with PEFT)
from peft_parscale import ParScaleConfig


@dataclass(frozen=True)
class Arm:
    """What a model name stands for: ``base``, ``P<n>`` (ParScale, T = --prefix-length), ``P<n>T<t>`` or ``lora``,
    each but ``base`` with an optional ``@<learning rate>``, ParScale with P >= 2 also with ``+div<λ>`` before it."""

    kind: str  # "base", "parscale" or "lora"
    P: int | None = None
    prefix_length: int | None = None  # None: --prefix-length
    learning_rate: float | None = None  # None: --learning-rate or --lora-learning-rate
    diversity_weight: float | None = None  # λ of the stream-diversity term; None: no term
    # the training seed (data order, LoRA's initialisation); 0 is written without #, so no run has two names
    seed: int = 0


NUMBER = r"\d+(?:\.\d*)?(?:e-?\d+)?"
ARM_NAME = re.compile(
    rf"(?:base|lora|P(?P<P>[1-9]\d*)(?:T(?P<T>[1-9]\d*))?(?:\+div(?P<div>{NUMBER}))?)(?:@(?P<rate>{NUMBER}|best))?(?:#(?P<seed>[1-9]\d*))?"
)


def parse_arm(name: str) -> Arm:
    match = ARM_NAME.fullmatch(name)
    if match is None or (name.startswith("base") and (match["rate"] or match["seed"])):
        raise ValueError(
            f"models are named base, P<n>, P<n>T<t> or lora, optionally with @<learning rate> and then #<seed>, and "
            f"ParScale arms with +div<λ> before the rate: {name!r}"
        )
    rate = float(match["rate"]) if match["rate"] and match["rate"] != "best" else None
    seed = int(match["seed"]) if match["seed"] else 0
    if name.startswith("base"):
        return Arm("base")
    if name.startswith("lora"):
        return Arm("lora", learning_rate=rate, seed=seed)
    weight = float(match["div"]) if match["div"] else None
    if weight is not None and int(match["P"]) < 2:
        raise ValueError(f"{name}: a stream-diversity term (+div) needs P >= 2 streams")
    return Arm("parscale", int(match["P"]), int(match["T"]) if match["T"] else None, rate, weight, seed)


def seedless(name: str) -> str:
    """The arm's name without its ``#<seed>``: what runs of one arm with different seeds share."""
    return name.partition("#")[0]


def arm_learning_rate(arm: Arm, learning_rate: float, lora_learning_rate: float | None) -> float:
    """The arm's own rate (``@<rate>``), else `learning_rate` for ParScale and `lora_learning_rate` for LoRA, which
    has no default: ParScale's 5e-2 is far above any rate LoRA trains at."""
    if arm.learning_rate is not None:
        return arm.learning_rate
    if arm.kind == "lora":
        if lora_learning_rate is None:
            raise ValueError("LoRA needs its own learning rate: lora@<rate> (a grid point) or --lora-learning-rate")
        return lora_learning_rate
    return learning_rate


def arm_peft_config(arm: Arm, prefix_length: int, smoothing: float, lora_rank: int) -> ParScaleConfig | LoraConfig:
    """The adapter an arm trains: ParScale with text-initialised prefixes (T = the arm's, else `prefix_length`), or
    LoRA of rank `lora_rank` (alpha twice the rank) on every linear layer of the decoder (PEFT's "all-linear" leaves
    the output head out). LoRA has no text initialisation: PEFT's own (random A, zero B)."""
    if arm.kind == "base":
        raise ValueError("the base model has no adapter")
    if arm.kind == "lora":
        return LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear", task_type="CAUSAL_LM")
    return ParScaleConfig(
        P=arm.P, prefix_length=arm.prefix_length or prefix_length, smoothing=smoothing, prefix_init="text"
    )
