"""Evaluation: held-out loss against a hand computation, HumanEval scoring, generation and the `parscale eval` CLI."""

import json
import math
import socket
import threading

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from reference import (
    LOGIT_TOLERANCE,
    adapter_tensors,
    randomize_adapter,
    reference_greedy,
    reference_logits,
    training_args,
)
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoTokenizer, GenerationConfig
from trl import SFTTrainer

import peft_parscale  # noqa: F401
from peft_parscale import ParScaleConfig, humaneval
from peft_parscale.cli import main as parscale_main
from peft_parscale.eval import completion_loss, heldout_loss, prompt_completion_ids
from peft_parscale.humaneval import (
    evaluate_humaneval,
    generation_config,
    load_problems,
    pass_at_k,
    score_completions,
)
from peft_parscale.testing import save_tiny_checkpoint

TEXTS = ["def add(a, b):\n    return a + b\n", "x = 1", "import os\nprint(os.sep)\n" * 2, "z"]


@pytest.fixture(scope="module")
def parscale_model():
    tokenizer = tiny_tokenizer()
    model = get_peft_model(tiny_model(vocab_size=len(tokenizer)), ParScaleConfig(P=3, prefix_length=4))
    randomize_adapter(model, scale=0.3)
    reference = tiny_model(vocab_size=len(tokenizer))  # the same base weights (same seed), left unwrapped
    return model.eval(), tokenizer, reference


def test_heldout_loss_matches_hand_computation(parscale_model):
    model, tokenizer, reference = parscale_model
    seq_len = 12
    nll, count = 0.0, 0
    for text in TEXTS:  # each document on its own, windows of 12 tokens, the last one shorter, none seeing the last
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), seq_len):
            window = torch.tensor(ids[start : start + seq_len])
            if len(window) < 2:
                continue
            logits = reference_logits(reference, window, adapter_tensors(model)).double()
            for t in range(len(window) - 1):
                nll -= logits[t, window[t + 1]].item() - torch.logsumexp(logits[t], 0).item()
                count += 1
    result = heldout_loss(model, tokenizer, TEXTS, seq_len=seq_len, batch_size=3, progress=False)
    assert (
        result["tokens"] == count == sum(len(text) for text in TEXTS[:3]) - 8
    )  # 3 + 1 + 4 windows; "z" predicts nothing
    assert result["loss"] == pytest.approx(nll / count, abs=2e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    with model.disable_adapter():
        base = heldout_loss(model, tokenizer, TEXTS, seq_len=seq_len, batch_size=3, progress=False)
    assert abs(base["loss"] - result["loss"]) > 1e-3  # the adapter is what was scored
    with pytest.raises(ValueError, match="no text"):
        heldout_loss(model, tokenizer, ["z"], seq_len=seq_len, progress=False)


PAIRS = [
    {"prompt": "def inc(x):\n", "completion": "    return x + 1\n"},
    {"prompt": 'def noop():\n    """Nothing."""\n', "completion": "    pass\n<|im_end|>"},  # ends with EOS already
]
CONVERSATION = {
    "prompt": [{"role": "user", "content": "Add one."}],
    "completion": [{"role": "assistant", "content": "x + 1"}],
}


def test_prompt_completion_ids_are_what_trl_trains_on(tmp_path):
    # the tiny tokenizer has one token per character, and one per special token
    tokenizer = tiny_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, start = prompt_completion_ids(tokenizer, PAIRS[0])
    assert start == len("def inc(x):\n") and ids[:-1] == [
        tokenizer.convert_tokens_to_ids(c) for c in "def inc(x):\n    return x + 1\n"
    ]
    assert ids[-1] == eos  # appended, as TRL does
    ids, start = prompt_completion_ids(tokenizer, PAIRS[1])
    assert start == len('def noop():\n    """Nothing."""\n') and ids.count(eos) == 1
    # the chat template (peft_parscale.testing.CHAT_TEMPLATE) by hand: the prompt ends with the assistant header
    prompt = "<|im_start|>user\nAdd one.<|im_end|>\n<|im_start|>assistant\n"
    ids, start = prompt_completion_ids(tokenizer, CONVERSATION)
    assert ids == tokenizer(prompt + "x + 1<|im_end|>\n")["input_ids"] and start == len(tokenizer(prompt)["input_ids"])
    # and what SFTTrainer prepares from the same rows: its labels hide exactly the prompt
    for rows in (PAIRS, [CONVERSATION]):
        trainer = SFTTrainer(
            model=tiny_model(vocab_size=len(tokenizer)),
            args=training_args(tmp_path, max_length=512),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        for row, prepared in zip(rows, trainer.train_dataset):
            ids, start = prompt_completion_ids(tokenizer, row)
            assert prepared["input_ids"] == ids
            assert prepared["labels"] == [-100] * start + ids[start:]


def test_completion_loss_scores_the_completion_given_the_prompt():
    tokenizer = tiny_tokenizer()
    # float64, so that the reference comparison is tight (see below)
    model = get_peft_model(
        tiny_model(vocab_size=len(tokenizer), dtype=torch.float64), ParScaleConfig(P=2, prefix_length=4)
    )
    randomize_adapter(model, scale=0.3)
    reference = tiny_model(vocab_size=len(tokenizer), dtype=torch.float64)
    rows = [*PAIRS, CONVERSATION]
    expected_nll, expected_tokens, bound = [], [], 0.0
    for row, prompt in zip(rows, ["def inc(x):\n", 'def noop():\n    """Nothing."""\n', None]):
        if prompt is None:
            prompt = "<|im_start|>user\nAdd one.<|im_end|>\n<|im_start|>assistant\n"
            text = prompt + "x + 1<|im_end|>\n"
        else:
            text = prompt + row["completion"] + ("" if row["completion"].endswith("<|im_end|>") else "<|im_end|>")
        tokens = torch.tensor(tokenizer(text)["input_ids"])
        first = len(tokenizer(prompt)["input_ids"])  # the first completion token
        logits = reference_logits(reference, tokens, adapter_tensors(model))
        log_probs = logits.log_softmax(-1)
        expected_nll.append(-sum(log_probs[t - 1, tokens[t]].item() for t in range(first, len(tokens))))
        expected_tokens.append(len(tokens) - first)
        # logits agree to LOGIT_TOLERANCE·max(1, |logit|) elementwise, and a log-softmax entry moves by at most twice
        # the largest change of its logits
        bound = max(bound, 2 * LOGIT_TOLERANCE[torch.float64] * max(1.0, logits.abs().max().item()))
    result = completion_loss(model, tokenizer, rows, batch_size=2, progress=False)
    assert result["scored_tokens"] == expected_tokens == [len("    return x + 1\n") + 1, len("    pass\n") + 1, 7]
    for actual, expected, count in zip(result["nll"], expected_nll, expected_tokens):
        assert actual == pytest.approx(expected, abs=bound * count)
    assert result["loss"] == pytest.approx(sum(expected_nll) / sum(expected_tokens), abs=bound)
    assert (result["pairs"], result["tokens"]) == (3, sum(expected_tokens))
    with model.disable_adapter():
        base = completion_loss(model, tokenizer, rows, progress=False)
    assert abs(base["loss"] - result["loss"]) > 100 * bound  # the adapter is what was scored


CANONICAL_TASKS = ["HumanEval/0", "HumanEval/2", "HumanEval/53"]


def as_generated(problem: dict, body: str, mode: str) -> str:
    """What a model would have written, in each prompt mode, for a function with this body."""
    if mode == "completion":  # the body, then more top-level code that the stop sequences must cut off
        return body + "\n\nprint(undefined_name)\n"
    return (
        f"Here is the function:\n```python\n{problem['prompt']}{body}```\nIt works.\n"
        "```python\nassert False  # a later block, which must be ignored\n```"
    )


@pytest.mark.parametrize("mode", ["completion", "chat"])
def test_humaneval_scores_canonical_solutions_and_a_wrong_one(mode):
    problems = load_problems(CANONICAL_TASKS)
    canonical = [[as_generated(problem, problem["canonical_solution"], mode)] for problem in problems]
    assert score_completions(problems, canonical, mode, workers=2)["pass@1"] == 1.0
    wrong = [[as_generated(problem, "    return None\n", mode)] for problem in problems]
    result = score_completions(problems, wrong, mode, workers=2)
    assert result["pass@1"] == 0.0
    assert all(sample["result"].startswith("failed") for sample in result["samples"])


def test_humaneval_pass_at_k_estimator_and_timeouts():
    assert pass_at_k([2, 0], 5, 2) == pytest.approx((1 - 3 / 10 + 0) / 2)  # 1 − C(3,2)/C(5,2) for the first problem
    assert pass_at_k([1, 5], 5, 1) == pytest.approx((1 / 5 + 1) / 2)
    with pytest.raises(ValueError, match="at least 10 samples"):
        pass_at_k([1], 5, 10)
    (problem,) = load_problems(["HumanEval/53"])
    samples = [["    while True:\n        pass\n"], ["    return x + y\n"]]
    result = score_completions([problem, problem], samples, "completion", k=(1,), workers=2, timeout=0.5)
    assert [sample["result"] for sample in result["samples"]] == ["timed out", "passed"]


def test_generated_code_has_no_network():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    problem = {
        "task_id": "network",
        "prompt": "import socket\n\ndef probe():\n",
        "entry_point": "probe",
        "test": "def check(candidate):\n    assert candidate() == 'unreachable'\n",
    }
    body = (
        "    try:\n"
        f"        socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "        return 'connected'\n"
        "    except OSError:\n"
        "        return 'unreachable'\n"
    )
    socket.create_connection(("127.0.0.1", port), timeout=1).close()  # reachable from here
    assert score_completions([problem], [[body]], "completion", workers=1)["pass@1"] == 1.0
    server.close()


# The Codex paper's stop sequences (what the package cuts completions at: checked below)
CODEX_STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
TOY_PROBLEMS = [
    {"task_id": f"toy/{i}", "prompt": prompt, "entry_point": "f", "test": "def check(f):\n    assert f(1) == 2\n"}
    for i, prompt in enumerate(
        [
            "def f(x):\n",
            "def f(x):\n    '''Add one.'''\n",
            "def f(value):\n    return",
            "def f(n):\n    if n:\n",
            "def f(a, b=2):\n    '''Sum.'''\n    return a +",
        ]
    )
]


@pytest.mark.parametrize("fast_path", [False, True], ids=["generate", "fast_path"])
@pytest.mark.parametrize("mode", ["completion", "chat"])
def test_batched_left_padded_generation_matches_reference_greedy(parscale_model, mode, fast_path):
    from peft_parscale.humaneval import STOP_SEQUENCES, build_prompt

    model, tokenizer, reference = parscale_model
    new_tokens = 6
    result = evaluate_humaneval(
        model,
        tokenizer,
        mode,
        max_new_tokens=new_tokens,
        batch_size=3,  # batches of 3 and 2 prompts; on the fast path the second is filled up with a third row
        problems=TOY_PROBLEMS,
        workers=1,
        progress=False,
        fast_path=fast_path,
    )
    assert result["num_problems"] == 5 and result["num_samples"] == 1 and "pass@1" in result
    assert len(result["batch_seconds"]) == 2
    assert set(STOP_SEQUENCES) == set(CODEX_STOP_SEQUENCES)
    for problem, sample in zip(TOY_PROBLEMS, result["samples"]):
        prompt = torch.tensor(tokenizer(build_prompt(problem, mode, tokenizer))["input_ids"])
        expected = reference_greedy(reference, prompt, adapter_tensors(model), new_tokens)[len(prompt) :]
        if tokenizer.eos_token_id in expected.tolist():  # generation ends at the end-of-sequence token
            expected = expected[: expected.tolist().index(tokenizer.eos_token_id)]
        reference_text = tokenizer.decode(expected, skip_special_tokens=True)
        if mode == "completion":  # cut before the first stop sequence, where generation also stops
            cuts = [reference_text.find(stop) for stop in CODEX_STOP_SEQUENCES if stop in reference_text]
            reference_text = reference_text[: min(cuts, default=len(reference_text))]
        assert reference_text  # every toy problem's reference continues it: an empty generation cannot pass
        assert sample["generated"] == reference_text


def test_the_fast_path_gives_every_batch_of_both_modes_one_shape(parscale_model, monkeypatch):
    """One decode-step shape, so one compilation on CUDA: batches of 2, 2 and 1 prompts of 10 to 203 tokens, in both
    prompt modes, reach the fast path as one (rows, length) and are decoded by one `FastDecoder`. The completions
    themselves are checked against the reference above, where the last batch is filled up in the same way."""
    from peft_parscale import decode

    model, tokenizer, _ = parscale_model
    shapes, decoders = [], []
    fast_generate = humaneval.fast_generate

    def recorded_fast_generate(model, input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        assert kwargs["compile_options"]["dynamic"] is False  # not torch.compile's automatic dynamic shapes
        return fast_generate(model, input_ids, *args, **kwargs)

    class RecordedFastDecoder(decode.FastDecoder):
        def __init__(self, *args, **kwargs):
            decoders.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(humaneval, "fast_generate", recorded_fast_generate)
    monkeypatch.setattr(decode, "FastDecoder", RecordedFastDecoder)
    monkeypatch.setattr(decode.causal_lm_of(model), "_parscale_fast_decoder", None)  # none left by earlier tests
    for mode in ("completion", "chat"):
        result = evaluate_humaneval(
            model, tokenizer, mode, max_new_tokens=3, batch_size=2, problems=TOY_PROBLEMS, workers=1,
            progress=False, fast_path=True,
        )  # fmt: skip
        assert len(result["samples"]) == 5 and len(result["batch_seconds"]) == 3
        assert (result["rows"], result["prompt_length"]) == (2, humaneval.FAST_PATH_PROMPT_MULTIPLE)
    assert shapes == [(2, humaneval.FAST_PATH_PROMPT_MULTIPLE)] * 6  # the tiny tokenizer's prompts: 10 to 203 tokens
    assert len(decoders) == 1


def test_batches_are_of_equal_size_so_that_little_is_filled_up(parscale_model, monkeypatch):
    """7 samples, at most 5 per batch: two batches of 4 (one filler row), not 5 and 2 + 3 fillers."""
    model, tokenizer, _ = parscale_model
    rows = []
    fast_generate = humaneval.fast_generate

    def recorded_fast_generate(model, input_ids, *args, **kwargs):
        rows.append(input_ids.shape[0])
        return fast_generate(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(humaneval, "fast_generate", recorded_fast_generate)
    for batch_size, expected in ((5, [4, 4]), (3, [3, 3, 3]), (7, [7]), (100, [7])):
        rows.clear()
        result = evaluate_humaneval(
            model, tokenizer, num_samples=7, k=(1,), max_new_tokens=2, batch_size=batch_size,
            problems=TOY_PROBLEMS[:1], workers=1, progress=False, fast_path=True,
        )  # fmt: skip
        assert rows == expected and len(result["samples"]) == 7


@pytest.mark.parametrize("fast_path", [False, True], ids=["generate", "fast_path"])
def test_sampling_gives_num_samples_per_problem(parscale_model, fast_path):
    model, tokenizer, _ = parscale_model
    result = evaluate_humaneval(
        model,
        tokenizer,
        num_samples=3,
        k=(1, 3),
        max_new_tokens=4,
        problems=TOY_PROBLEMS[:2],
        workers=1,
        progress=False,
        fast_path=fast_path,
    )
    assert [sample["task_id"] for sample in result["samples"]] == ["toy/0"] * 3 + ["toy/1"] * 3
    assert len({sample["generated"] for sample in result["samples"]}) > 1  # sampled, not greedy
    assert {"pass@1", "pass@3", "temperature"} <= set(result)


def test_the_fast_path_is_the_default_on_cuda_and_generate_elsewhere(parscale_model, monkeypatch):
    model, tokenizer, _ = parscale_model
    fast_path_calls, generate_calls = [], []
    fast_generate, generate = humaneval.fast_generate, type(model).generate

    def recorded_fast_generate(*args, **kwargs):
        fast_path_calls.append(kwargs)
        return fast_generate(*args, **kwargs)

    def recorded_generate(self, *args, **kwargs):
        generate_calls.append(kwargs)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(humaneval, "fast_generate", recorded_fast_generate)
    monkeypatch.setattr(type(model), "generate", recorded_generate)

    def evaluate(**settings):
        return evaluate_humaneval(
            model, tokenizer, max_new_tokens=3, problems=TOY_PROBLEMS[:1], workers=1, progress=False, **settings
        )

    assert not humaneval.fast_path_by_default(model)  # a model on the CPU
    assert evaluate()["generation"] == "generate"
    assert (len(fast_path_calls), len(generate_calls)) == (0, 1)
    monkeypatch.setattr(humaneval, "fast_path_by_default", lambda model: True)  # as for a model on a CUDA device
    assert evaluate()["generation"] == "fast_generate"
    assert (len(fast_path_calls), len(generate_calls)) == (1, 1)
    assert "compile" not in fast_path_calls[0]  # so fast_generate compiles the step on CUDA
    assert evaluate(fast_path=False)["generation"] == "generate"  # an explicit choice wins
    assert (len(fast_path_calls), len(generate_calls)) == (1, 2)


def test_humaneval_settings_override_the_checkpoint_s_decoding_defaults(parscale_model, monkeypatch):
    model, tokenizer, _ = parscale_model
    qwen_like = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 2.0}
    prompt = tokenizer(["def f(x):\n    return x"], return_tensors="pt")

    def new_tokens(**settings):
        with torch.no_grad():
            return model.generate(**prompt, pad_token_id=tokenizer.pad_token_id, **settings)[0, -8:].tolist()

    greedy = new_tokens(max_new_tokens=8, do_sample=False)
    for name, value in qwen_like.items():  # what an instruct checkpoint's generation_config.json sets
        monkeypatch.setattr(model.generation_config, name, value)
    assert new_tokens(max_new_tokens=8, do_sample=False) != greedy  # generate applies the checkpoint's penalty
    config = generation_config(tokenizer, model, max_new_tokens=8, temperature=None)
    assert new_tokens(generation_config=config) == greedy


def test_humaneval_generation_stops_at_the_tokenizer_s_eos_token_too(parscale_model, monkeypatch):
    """An adapter trained by TRL ends its answers with the tokenizer's EOS token; generation must stop there even
    where the checkpoint's generation config names another end-of-sequence token."""
    model, tokenizer, _ = parscale_model
    prompt = tokenizer(["def f(x):\n    return x"], return_tensors="pt")

    def new_tokens(config):
        with torch.no_grad():
            return model.generate(**prompt, generation_config=config)[0, prompt["input_ids"].shape[1] :].tolist()

    free = new_tokens(GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0))
    stop = free[3]  # a token greedy decoding emits, made the tokenizer's EOS token below
    never = next(i for i in range(len(tokenizer)) if i not in free and i != stop)
    monkeypatch.setattr(model.generation_config, "eos_token_id", never)  # the checkpoint's EOS: never emitted
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop)
    config = generation_config(tokenizer, model, max_new_tokens=12, temperature=None)
    assert sorted(config.eos_token_id) == sorted([never, stop])
    assert new_tokens(config) == free[: free.index(stop) + 1]


def test_parscale_eval_cli(tmp_path, monkeypatch):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    output = tmp_path / "results.json"
    argv = ["eval", "--model_name_or_path", str(checkpoint), "--dtype", "float32", "--dataset_name", str(data)]
    assert parscale_main([*argv, "--tasks", "loss", "--seq_len", "12", "--output", str(output)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in TEXTS]
    windows = [min(12, n - start) for n in lengths for start in range(0, n, 12)]  # 12-token windows of each document
    assert json.loads(output.read_text())["loss"]["tokens"] == sum(n - 1 for n in windows)
    with pytest.raises(SystemExit) as exit_info:  # one line ("unknown tasks ...") and exit status 2, nothing loaded
        parscale_main([*argv, "--tasks", "perplexity"])
    assert exit_info.value.code == 2
    fast_path_settings = []  # what `parscale eval` asks HumanEval for: the device's default path, or the one given

    def evaluate_humaneval(model, tokenizer, **settings):
        fast_path_settings.append(settings["fast_path"])
        return {"num_samples": 1, "pass@1": 0.0}

    monkeypatch.setattr(humaneval, "evaluate_humaneval", evaluate_humaneval)
    humaneval_argv = [*argv, "--tasks", "humaneval", "--humaneval_modes", "completion"]
    assert parscale_main(humaneval_argv) == parscale_main([*humaneval_argv, "--fast_path", "false"]) == 0
    assert fast_path_settings == [None, False]
