"""``parscale sft``: TRL's ``sft`` script with a ParScale adapter (or TRL's LoRA, or none) on the frozen model.

It takes every argument of ``trl sft`` (TRL's own ``ScriptArguments``, ``SFTConfig``, ``ModelConfig`` and
``DatasetMixtureConfig``, parsed by TRL's ``TrlParser``, so YAML ``--config`` files work exactly as there), plus
``--peft parscale|lora|none`` and one flag per ``ParScaleConfig`` field (``--P``, ``--prefix_length``,
``--smoothing``, ``--init_std``, ``--prefix_init``, ...). With ``--prefix_init text`` and no ``--prefix_init_text``,
the prefixes start from windows of the training data (see ``ParScaleSFTTrainer``). ``parscale sft`` launches the
training through ``accelerate launch`` like ``trl sft`` (so ``--num_processes``, ``--accelerate_config`` and
multi-GPU runs work the same way); ``python -m peft_parscale.sft`` runs it in the current process.

Every argument is parsed and checked before anything is launched: a bad flag or value ends in one line and exit status
2. ``--bf16`` and ``--use_cpu`` default to what the machine supports (`SFTParser`), so the same line runs on a GPU and
on a laptop. ``--dataset_name`` also takes a local folder of ``train.jsonl``/``test.jsonl`` files or a dataset saved
with ``save_to_disk`` (`peft_parscale.data.load_data`), and ``--model_name_or_path`` the Hub id of a packaged model,
read from its local copy (`peft_parscale.pretrained`).

Example::

    parscale sft --config recipes/qwen2.5-0.5b-code-p8.yaml
    parscale sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara --P 4 --output_dir out
    parscale sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara --peft lora --lora_r 16 ...
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import subprocess
import sys
from typing import Literal

import torch
from accelerate.commands.launch import launch_command, launch_command_parser
from accelerate.utils import DistributedType
from peft import PeftConfig
from torch.nn.attention import SDPBackend
from torch.nn.parallel import DistributedDataParallel
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, get_peft_config
from trl.cli.accelerate_config import resolve_accelerate_config_argument

from peft_parscale.cli import CommandParser
from peft_parscale.config import ParScaleConfig
from peft_parscale.decode_attention import compile_safe_sdpa_kernel
from peft_parscale.model_card import update_model_card
from peft_parscale.precision import bf16_is_native, training_precision
from peft_parscale.prefix_init import (
    broadcast_prefixes,
    document_boundary,
    init_prefixes_from_token_ids,
    with_boundary,
)
from peft_parscale.pretrained import name_base_model, resolve_model

# The ParScaleConfig fields a user sets (PeftConfig's own fields and the auto-filled base_shape are not flags); the
# flags are generated from them, so their defaults and help texts have one source.
PARSCALE_FIELDS = [
    field
    for field in dataclasses.fields(ParScaleConfig)
    if field.name not in {f.name for f in dataclasses.fields(PeftConfig)} | {"base_shape"}
]
ParScaleArguments = dataclasses.make_dataclass(
    "ParScaleArguments",
    [
        (
            "peft",
            Literal["parscale", "lora", "none"],
            dataclasses.field(
                default="parscale",
                metadata={"help": "Adapter to train: ParScale, TRL's LoRA (its --lora_* flags apply), or none."},
            ),
        ),
        *[
            (field.name, field.type, dataclasses.field(default=field.default, metadata=field.metadata))
            for field in PARSCALE_FIELDS
        ],
    ],
)
ParScaleArguments.__doc__ = "The adapter `parscale sft` trains, and the ParScaleConfig fields (generated from it)."


# every sdpa kernel but cuDNN's (see ParScaleSFTTrainer.train)
SDPA_BACKENDS_FOR_TRAINING = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
    SDPBackend.OVERRIDEABLE,
]


# Prefixes start from the frozen model's own keys/values of training windows: lower loss than random prefixes at every
# learning rate of the recycling ablation (RESULTS.md). `--prefix_init random` restores the config default.
PARSCALE_SFT_DEFAULTS = {"prefix_init": "text"}
USAGE = """parscale sft --model_name_or_path MODEL --dataset_name DATA --output_dir DIR [FLAG VALUE ...]
       parscale sft --config FILE.yaml [FLAG VALUE ...]"""


def description() -> str:
    """The head of ``parscale sft --help``: what it does, the ParScale flags, the launcher's and the usual TRL flags;
    the list of every ``trl sft`` flag follows it."""
    defaults = {field.name: field.default for field in dataclasses.fields(ParScaleArguments)} | PARSCALE_SFT_DEFAULTS
    parscale_flags = "\n".join(
        f"  --{field.name:<22} {field.metadata['help']}"
        + (f" (default: {defaults[field.name]})" if defaults[field.name] is not None else "")
        for field in dataclasses.fields(ParScaleArguments)
    )
    return f"""Train a ParScale adapter (or TRL's LoRA, or none) on a frozen model with TRL's SFTTrainer: `trl sft` with
ParScale's flags, launched through `accelerate launch`. Flags are checked before anything is launched.

ParScale:
{parscale_flags}

Configuration and launching:
  --config FILE.yaml       every flag's value from a YAML file; flags on the command line override it
  --accelerate_config NAME one of TRL's accelerate configs (multi_gpu, fsdp2, zero3, ...) or a config file
  --num_processes N        processes to train on (one per GPU); any other `accelerate launch` flag works too

Most used TRL flags (all of them follow):
  --model_name_or_path     a Hub id or a local checkpoint (a packaged model's Hub id loads its local copy)
  --dataset_name           a Hub dataset, a folder with train.jsonl/test.jsonl, or a dataset saved with save_to_disk
  --output_dir --max_steps --learning_rate --per_device_train_batch_size --max_length --packing
  --bf16 / --use_cpu       default: bfloat16 autocast where the device computes it natively (else float32), and
                           use_cpu where there is no GPU"""


# transformers 5.2x renamed `gradient_checkpointing` to `activation_checkpointing` (keeping the old name as a deprecated
# alias); 5.17 has only the old name.
RENAMED_CHECKPOINTING = "activation_checkpointing" in {field.name for field in dataclasses.fields(SFTConfig)}


class SFTParser(CommandParser):
    """The ``parscale sft`` parser: `CommandParser` that fills in the flags whose default depends on what was given.

    These default to ``None`` in `make_parser`, so that after parsing (the ``--config`` file's values are parser
    defaults, the command line's are parsed values) ``None`` means given nowhere:

    - ``bf16`` and ``use_cpu``: what the hardware supports (`training_precision`).
    - ``gradient_checkpointing``: TRL turns it on by default under its old name, which makes transformers 5.2x warn
      of the deprecated name at every run; when neither name is given, it is turned on under the new name instead.
    """

    def parse_known_args(self, args=None, namespace=None):
        namespace, remaining = super().parse_known_args(args, namespace)
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        device = "cpu" if namespace.use_cpu or accelerator is None else accelerator.type
        namespace.bf16, namespace.use_cpu = training_precision(
            device, bf16_is_native(device), namespace.bf16, namespace.use_cpu, namespace.fp16
        )
        if (
            RENAMED_CHECKPOINTING
            and namespace.gradient_checkpointing is None
            and namespace.activation_checkpointing is None
        ):
            namespace.activation_checkpointing = SFTConfig.gradient_checkpointing  # TRL's default
        return namespace, remaining


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The flags' defaults, as HfArgumentParser shows them, under a description kept as written."""


def make_parser(prog: str | None = None) -> SFTParser:
    """TRL's sft parser (same dataclasses, same YAML handling) with the ParScale arguments added.

    ``--prefix_init`` defaults to ``text`` (the texts come from the training data). ``--bf16`` and ``--use_cpu``
    default to what the hardware supports (`training_precision`): bfloat16 autocast only where it is native (TRL
    turns it on everywhere, and emulated bfloat16 is several times slower than float32), and ``use_cpu`` where
    there is no GPU (transformers refuses bfloat16 on a CPU without it). A value given on the command line or in a
    ``--config`` file always wins.
    """
    parser = SFTParser(
        (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, ParScaleArguments),
        prog=prog,
        usage=USAGE,
        description=description(),
        formatter_class=_HelpFormatter,
    )
    parser.set_defaults(**PARSCALE_SFT_DEFAULTS, bf16=None, use_cpu=None)
    if RENAMED_CHECKPOINTING:
        parser.set_defaults(gradient_checkpointing=None)
    return parser


def peft_config_from_args(parscale_args, model_args: ModelConfig) -> PeftConfig | None:
    """The adapter config ``--peft`` asks for: ``ParScaleConfig``, TRL's LoRA config, or ``None`` (full training)."""
    if model_args.use_peft and parscale_args.peft != "lora":
        raise ValueError(
            f"--use_peft selects TRL's LoRA, but --peft is {parscale_args.peft!r}. Use --peft lora for LoRA "
            "(with TRL's --lora_* flags), or drop --use_peft."
        )
    if parscale_args.peft == "parscale":
        return ParScaleConfig(**{field.name: getattr(parscale_args, field.name) for field in PARSCALE_FIELDS})
    if parscale_args.peft == "lora":
        return get_peft_config(dataclasses.replace(model_args, use_peft=True))
    return None


class ParScaleSFTTrainer(SFTTrainer):
    """``SFTTrainer`` that starts text-initialised prefixes from the training data and keeps the model card's ParScale
    section.

    With ``ParScaleConfig(prefix_init="text")`` and no ``prefix_init_text``, stream p's prefixes start as the base
    model's keys/values of the first T - 1 tokens of the p-th training row of at least T - 1 tokens, then a document
    boundary (see ``prefix_init.py``). In a distributed run process 0 computes them and broadcasts them to the others
    (`broadcast_prefixes`), so every process starts from the same prefixes whatever its own copy of the base model
    holds.

    ``train()`` runs with every sdpa kernel but cuDNN's, whose backward can return NaN gradients under explicit masks
    on Hopper GPUs (see ``train``). On several processes it refuses to start after ``evaluate()``, which would leave
    them without gradient averaging (`check_data_parallel_wrapping`); ``eval_on_start=True`` gives that evaluation.

    TRL writes README.md from its own template whenever it creates the card (at each checkpoint, and in
    ``push_to_hub`` after the adapter has been saved), which drops what ``ParScaleConfig.save_pretrained`` merged in.
    With a plain ``SFTTrainer``, ``trainer.save_model()`` still writes the full card; ``trainer.push_to_hub()`` then
    uploads TRL's card alone.

    Example::

        trainer = ParScaleSFTTrainer(
            model="Qwen/Qwen2.5-0.5B", train_dataset=dataset, peft_config=ParScaleConfig(P=4, prefix_init="text")
        )
    """

    def __init__(self, model, *args, peft_config: PeftConfig | None = None, **kwargs) -> None:
        # Overriding __init__ is the only way in: `SFTTrainer.__init__` creates the adapter (`get_peft_model`) before it
        # prepares the training data, with no method in between. The adapter is therefore created with random prefixes
        # and initialised here, once the data is prepared; its config then says "text" again, as it is saved.
        texts_from_data = (
            isinstance(peft_config, ParScaleConfig)
            and peft_config.prefix_init == "text"
            and peft_config.prefix_init_text is None
        )
        if texts_from_data:
            peft_config = dataclasses.replace(peft_config, prefix_init="random")
        # TRL loads a model named by a string itself; a packaged model's Hub id is read from its local copy, and the
        # adapter then names the Hub id as its base (see `peft_parscale.pretrained.load_causal_lm`)
        location = resolve_model(model) if isinstance(model, str) else model
        super().__init__(location, *args, peft_config=peft_config, **kwargs)
        if location != model:
            name_base_model(self.model, model)
        if texts_from_data:
            config = self.model.active_peft_config
            windows = prefix_init_windows(self.train_dataset, config.P, config.prefix_length - 1)
            token_ids = with_boundary(windows, document_boundary(self.processing_class))
            # Only process 0's base weights are sure to be real: under FSDP's cpu_ram_efficient_loading (TRL's
            # fsdp2.yaml) transformers leaves another process's weights that are missing from the checkpoint on the
            # meta device, counting on accelerate to broadcast process 0's state dict in `prepare`; FSDP2 without that
            # option broadcasts nothing. So process 0 reads the texts and every process takes its prefixes.
            if self.accelerator.is_main_process:
                init_prefixes_from_token_ids(self.model, token_ids)
            if self.accelerator.num_processes > 1:
                broadcast_prefixes(self.model, self.accelerator.device)
            config.prefix_init = "text"

    def train(self, *args, **kwargs):
        check_data_parallel_wrapping(self)
        # On Hopper GPUs torch >= 2.11 prefers cuDNN's attention, whose backward returns NaN query gradients when an
        # explicit mask is passed, the key length is 64 more than a multiple of 128, and a row's log-sum-exp is below
        # ln(FLT_MAX) (pytorch/pytorch#196678; Qwen2.5's massive-activation heads reach it, huggingface/trl#7181).
        # Training here passes explicit masks whenever the batch is padded or packed (the prefix columns are added to
        # them), and the key length varies with the prefix and the data. So training runs with every sdpa kernel
        # but cuDNN's, also in compiled layers (`--torch_compile`); the flag is restored afterwards.
        with compile_safe_sdpa_kernel(SDPA_BACKENDS_FOR_TRAINING):
            return super().train(*args, **kwargs)

    def create_model_card(self, *args, **kwargs) -> None:
        super().create_model_card(*args, **kwargs)
        config = getattr(self.model, "active_peft_config", None)
        if self.is_world_process_zero() and isinstance(config, ParScaleConfig):
            update_model_card(self.args.output_dir, config)


def wrapped_in_ddp(trainer: SFTTrainer) -> bool:
    """Whether the model the Trainer trains is wrapped in ``DistributedDataParallel`` (inside torch.compile's wrapper,
    where ``torch_compile`` put one)."""
    wrapped = trainer.model_wrapped
    return isinstance(getattr(wrapped, "_orig_mod", wrapped), DistributedDataParallel)


def check_data_parallel_wrapping(trainer: SFTTrainer) -> None:
    """Raise `ValueError` where ``trainer.train()`` would train several processes without averaging their gradients.

    ``trainer.evaluate()`` (or ``predict()``) before the first ``train()`` prepares the model for evaluation only
    (``Accelerator.prepare_model(..., evaluation_mode=True)``, `Trainer.evaluation_loop`), which marks it as prepared
    without wrapping it in ``DistributedDataParallel``. ``train()`` then hands it to ``Accelerator.prepare``, which
    never prepares a model twice and returns it as it is (or, with ``torch_compile``, keeps the compiled model the
    evaluation made): every process trains on its own share of each batch and the processes drift apart, with no
    error (transformers 5.17 and 5.23, accelerate 1.15 and 1.16: ``experiments/ddp_sync_check.py``, whose raw results
    are in ``results/ddp-sync-cpu/``). ``eval_on_start=True`` evaluates inside ``train()``, after the wrapping. Models
    whose placement transformers manages itself (loaded distributed, or tensor parallel) are never wrapped in DDP by
    design and are left alone.
    """
    accelerator = trainer.accelerator
    # the processes that accelerate would wrap in DistributedDataParallel (`Accelerator.prepare_model`)
    data_parallel = accelerator.use_distributed and (
        accelerator.multi_device or accelerator.distributed_type == DistributedType.MULTI_CPU
    )
    placed_by_transformers = getattr(trainer, "is_distributed_loading_by_transformers", False)
    prepared = getattr(trainer.model, "_is_accelerate_prepared", False)
    if data_parallel and not placed_by_transformers and prepared and not wrapped_in_ddp(trainer):
        raise ValueError(
            f"trainer.evaluate() or predict() ran before trainer.train() on {accelerator.num_processes} processes: "
            "transformers then prepares the model for evaluation only, and train() would not wrap it in "
            "DistributedDataParallel, so the processes would not average their gradients. Evaluate at the start of "
            "training instead: SFTConfig(eval_on_start=True)."
        )


def prefix_init_windows(dataset, num_streams: int, length: int) -> torch.Tensor:
    """The first `length` token ids of the first `num_streams` rows with at least that many, of a training dataset as
    ``SFTTrainer`` prepared it (``Dataset`` or ``IterableDataset``), as a (P, length) tensor. The trainer reads
    ``prefix_length - 1`` of them and ends each stream's text with a document boundary, as `init_prefixes_from_text`
    does.

    Token ids, not text: by then TRL has tokenised text, conversational and prompt-completion datasets into
    ``input_ids`` and left pre-tokenised ones as they are, so one path serves them all; and the prefixes start from
    exactly the tokens the model trains on (decoding a window and tokenising it again need not give the same tokens).
    Every process of a distributed run prepares the same dataset, so all start from the same prefixes.
    """
    if dataset is None:
        raise ValueError("prefix_init='text' without prefix_init_text takes its texts from train_dataset: pass one.")
    windows = []
    for row in dataset:
        if "input_ids" not in row:
            raise ValueError("prefix_init='text' without prefix_init_text reads the prepared data's `input_ids`.")
        if len(row["input_ids"]) >= length:
            windows.append(list(row["input_ids"][:length]))
            if len(windows) == num_streams:
                return torch.tensor(windows, dtype=torch.long)
    raise ValueError(
        f"prefix_init='text' takes P={num_streams} windows of {length} tokens (prefix_length, less the document "
        f"boundary) from the training data, which has only {len(windows)} rows that long: give prefix_init_text, or a "
        "smaller prefix_length."
    )


def train(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig, dataset_args, parscale_args):
    """The body of TRL's ``sft`` script, with the adapter chosen by ``--peft``."""
    from trl import get_dataset, get_quantization_config

    from peft_parscale.data import load_data

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    else:
        streaming = script_args.dataset_streaming
        dataset = load_data(script_args.dataset_name, script_args.dataset_config, streaming=streaming)

    trainer = ParScaleSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=peft_config_from_args(parscale_args, model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub as {trainer.hub_model_id}.")
    return trainer


def _without_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """``items`` with the ordered ``subsequence`` removed (the parser's leftovers are a subsequence of argv)."""
    pending = iter(subsequence)
    current = next(pending, None)
    kept = []
    for item in items:
        if current is not None and item == current:
            current = next(pending, None)
        else:
            kept.append(item)
    return kept


def _missing_local_path(name: str) -> bool:
    """Whether ``name`` is written as a local path (not as a Hub id, ``name`` or ``org/name``) and does not exist, so
    that loading it would only ask the Hub for it and fail."""
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    return looks_local and not os.path.exists(os.path.expanduser(name))


def check_arguments(script_args, training_args, model_args, dataset_args, parscale_args) -> None:
    """Raise `ValueError` with a message for the user where the parsed arguments cannot train (what the dataclasses
    themselves check was checked when they were built)."""
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: a Hub id or a local checkpoint directory.")
    if not (dataset_args.datasets or script_args.dataset_name):
        raise ValueError(
            "--dataset_name is required: a Hub dataset, a folder with train.jsonl/test.jsonl, or a dataset saved with "
            "save_to_disk (or give `datasets:` in a --config file)."
        )
    names = {"--model_name_or_path": model_args.model_name_or_path, "--dataset_name": script_args.dataset_name}
    for flag, name in names.items():
        if name and _missing_local_path(name):
            raise ValueError(f"{flag} {name}: no such file or directory.")
    peft_config_from_args(parscale_args, model_args)  # ParScaleConfig checks its fields


def launch_arguments(leftovers: list[str], script_args: list[str], torch_compile: bool = False) -> argparse.Namespace:
    """``accelerate launch``'s arguments for running this module on ``script_args``: the strings the training
    script's parser did not take (with ``--accelerate_config`` resolved as ``trl sft`` does), checked by accelerate's
    own parser. Raises `ValueError` for a flag neither parser knows, or a bad value.

    With ``torch_compile`` (``--torch_compile true``), accelerate's regional compilation is turned on
    (``--dynamo_use_regional_compilation``): each decoder layer is compiled, one graph for all, and the rest of the
    model around them. Compiling the whole model instead makes transformers materialise the attention mask, which
    keeps sdpa from its flash kernel and was slower than compiling the layers (BENCHMARKS.md, training throughput)."""
    launch_args = resolve_accelerate_config_argument(leftovers)
    parser = launch_command_parser()
    parser.exit_on_error = False  # raise argparse.ArgumentError for a bad value rather than exit with its usage
    try:
        # the module name ends accelerate's own flags: a leftover after it would be taken as the script's
        _, unknown = parser.parse_known_args([*launch_args, "--module", __name__])
    except argparse.ArgumentError as error:
        raise ValueError(str(error)) from None
    if unknown:
        unknown = " ".join(unknown)
        raise ValueError(f"unrecognized arguments: {unknown} (not a flag of trl sft, ParScale or accelerate launch)")
    # given as a flag, so that accelerate counts it as set on the command line, which a config file does not override
    regional = ["--dynamo_use_regional_compilation"] if torch_compile else []
    return parser.parse_args([*launch_args, *regional, "--module", __name__, *script_args])


def main(argv: list[str]) -> int:
    """``parscale sft ARGS``: parse and check every argument here (``-h`` prints them), then train under
    ``accelerate launch``.

    Arguments the training script does not know are ``accelerate launch``'s, as with ``trl sft``. A bad flag or value
    ends in one line and exit status 2 before anything is launched; a failed training process ends with its own
    error (above) and exit status, without the launcher's traceback.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = make_parser(prog="parscale sft")
    *arguments, config_leftovers, cli_leftovers = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    _, training_args, model_args, _, _ = arguments
    # the precision chosen here (SFTParser) is passed on, so the training processes use exactly what was checked
    script_args = _without_subsequence(argv, cli_leftovers)
    script_args += ["--bf16", str(training_args.bf16), "--use_cpu", str(training_args.use_cpu)]
    try:
        check_arguments(*arguments)
        launch = launch_arguments(config_leftovers + cli_leftovers, script_args, training_args.torch_compile)
    except ValueError as error:
        parser.error(str(error))
    precision = "bfloat16 autocast" if training_args.bf16 else "fp16" if training_args.fp16 else "float32"
    device = "the CPU" if training_args.use_cpu else "the GPU(s)"
    print(f"parscale sft: training on {device} in {precision} (--bf16, --use_cpu to choose).", flush=True)
    resolve_model(model_args.model_name_or_path)  # a packaged model is converted once, here, not in every process
    try:
        launch_command(launch)
    except subprocess.CalledProcessError as error:  # one training process (its error is printed above)
        print(f"parscale sft: training failed (exit status {error.returncode}; its error is above).", file=sys.stderr)
        return error.returncode
    except ChildFailedError as error:  # several processes (torchrun): its text names the failed ones and their errors
        print(f"parscale sft: training failed.\n{error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    accelerator = train(*make_parser().parse_args_and_config(fail_with_unknown_args=False)).accelerator
    # Under `accelerate launch` the process group would otherwise be left for interpreter exit to tear down (torch
    # warns about that). It goes after the wrapped model: with the model still alive (the accelerator holds it), a
    # process of a 2-process CPU run now and then aborted at exit ("terminate called without an active exception"),
    # as tests/fsdp2_worker.py found for FSDP2. free_memory drops the accelerator's references; the trainer is gone.
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
