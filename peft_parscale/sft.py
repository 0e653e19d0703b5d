"""``parscale sft``: TRL's ``sft`` script with a ParScale adapter (or TRL's LoRA, or none) on the frozen model.

It takes every argument of ``trl sft`` (TRL's own ``ScriptArguments``, ``SFTConfig``, ``ModelConfig`` and
``DatasetMixtureConfig``, parsed by TRL's ``TrlParser``, so YAML ``--config`` files work exactly as there), plus
``--peft parscale|lora|none`` and one flag per ``ParScaleConfig`` field (``--P``, ``--prefix_length``,
``--smoothing``, ``--init_std``, ``--prefix_init``, ...). With ``--prefix_init text`` and no ``--prefix_init_text``,
the prefixes start from windows of the training data (see ``ParScaleSFTTrainer``). ``parscale sft`` launches the
training through ``accelerate launch`` like ``trl sft`` (so ``--num_processes``, ``--accelerate_config`` and
multi-GPU runs work the same way); ``python -m peft_parscale.sft`` runs it in the current process.

Example::

    parscale sft --config recipes/qwen2.5-0.5b-code-p8.yaml
    parscale sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara --P 4 --output_dir out
    parscale sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara --peft lora --lora_r 16 ...
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from accelerate.commands.launch import launch_command, launch_command_parser
from peft import PeftConfig
from torch.nn.attention import SDPBackend, sdpa_kernel
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config
from trl.cli.accelerate_config import resolve_accelerate_config_argument

from peft_parscale.config import ParScaleConfig
from peft_parscale.model_card import update_model_card
from peft_parscale.precision import bf16_is_native
from peft_parscale.prefix_init import document_boundary, init_prefixes_from_token_ids, with_boundary

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


def make_parser(prog: str | None = None) -> TrlParser:
    """TRL's sft parser (same dataclasses, same YAML handling) with the ParScale arguments added.

    ``--prefix_init`` defaults to ``text`` (the texts come from the training data). One default differs from
    ``trl sft``: where the hardware has no native bfloat16 (a CPU without AVX512-BF16 or AMX,
    see `peft_parscale.precision`), ``--bf16`` defaults to False, since emulated bfloat16 autocast is several times
    slower than float32 there. ``--bf16`` on the command line or ``bf16:`` in a ``--config`` file still wins (TrlParser
    applies the config file's values as parser defaults after this one).
    """
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, ParScaleArguments), prog=prog)
    # Prefixes start from the frozen model's own keys/values of training windows: lower loss than random prefixes at
    # every learning rate of the recycling ablation (RESULTS.md). `--prefix_init random` restores the config default.
    parser.set_defaults(prefix_init="text")
    if not bf16_is_native():
        parser.set_defaults(bf16=False)
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
    boundary (see ``prefix_init.py``).

    ``train()`` runs with every sdpa kernel but cuDNN's, whose backward can return NaN gradients under explicit masks
    on Hopper GPUs (see ``train``).

    TRL writes README.md from its own template whenever it creates the card (at each checkpoint, and in
    ``push_to_hub`` after the adapter has been saved), which drops what ``ParScaleConfig.save_pretrained`` merged in.
    With a plain ``SFTTrainer``, ``trainer.save_model()`` still writes the full card; ``trainer.push_to_hub()`` then
    uploads TRL's card alone.

    Example::

        trainer = ParScaleSFTTrainer(
            model="Qwen/Qwen2.5-0.5B", train_dataset=dataset, peft_config=ParScaleConfig(P=4, prefix_init="text")
        )
    """

    def __init__(self, *args, peft_config: PeftConfig | None = None, **kwargs) -> None:
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
        super().__init__(*args, peft_config=peft_config, **kwargs)
        if texts_from_data:
            config = self.model.active_peft_config
            windows = prefix_init_windows(self.train_dataset, config.P, config.prefix_length - 1)
            init_prefixes_from_token_ids(self.model, with_boundary(windows, document_boundary(self.processing_class)))
            config.prefix_init = "text"

    def train(self, *args, **kwargs):
        # On Hopper GPUs torch >= 2.11 prefers cuDNN's attention, whose backward returns NaN query gradients when an
        # explicit mask is passed, the key length is 64 more than a multiple of 128, and a row's log-sum-exp is below
        # ln(FLT_MAX) (pytorch/pytorch#196678; Qwen2.5's massive-activation heads reach it, huggingface/trl#7181).
        # Training here passes explicit masks whenever the batch is padded or packed (the prefix columns are added to
        # them), and the key length varies with the prefix and the data. So training runs with every sdpa kernel
        # but cuDNN's; the flag is restored afterwards.
        with sdpa_kernel(SDPA_BACKENDS_FOR_TRAINING):
            return super().train(*args, **kwargs)

    def create_model_card(self, *args, **kwargs) -> None:
        super().create_model_card(*args, **kwargs)
        config = getattr(self.model, "active_peft_config", None)
        if self.is_world_process_zero() and isinstance(config, ParScaleConfig):
            update_model_card(self.args.output_dir, config)


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
    from datasets import load_dataset
    from trl import get_dataset, get_quantization_config

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    else:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")

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


def main(argv: list[str]) -> int:
    """``parscale sft ARGS``: check the arguments here (``-h`` prints them), then train under ``accelerate launch``.

    Arguments the training script does not know are ``accelerate launch``'s, as with ``trl sft``.
    """
    parser = make_parser(prog="parscale sft")
    *_, config_leftovers, cli_leftovers = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = resolve_accelerate_config_argument(config_leftovers + cli_leftovers)
    script_args = _without_subsequence(argv, cli_leftovers)
    launch_command(launch_command_parser().parse_args([*launch_args, "--module", "peft_parscale.sft", *script_args]))
    return 0


if __name__ == "__main__":
    train(*make_parser().parse_args_and_config(fail_with_unknown_args=False))
