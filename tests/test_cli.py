"""The `parscale` command for a newcomer: the precision `parscale sft` picks, every flag checked before anything is
launched (one line, exit status 2), a failed training process reported as itself, `parscale eval`'s plan and limits,
local datasets, and smoke runs that leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SUBPROCESS_TIMEOUT
from datasets import Dataset, DatasetDict

from peft_parscale.cli import main as parscale_main
from peft_parscale.data import load_data
from peft_parscale.eval import EvalArguments, plan
from peft_parscale.precision import training_precision
from peft_parscale.sft import make_parser

# device, native bf16, --bf16, --use_cpu, --fp16 (None: not given) -> bf16, use_cpu. transformers refuses bf16 without
# use_cpu on a machine with no bf16 GPU, and TRL asks for bf16 by default.
PRECISION_TABLE = [
    ("cpu", True, None, None, None, True, True),  # a CPU with AMX or AVX512-BF16: bf16, allowed by use_cpu
    ("cpu", False, None, None, None, False, True),  # an AVX2 laptop: float32, emulated bf16 is several times slower
    ("cpu", True, False, None, None, False, True),  # explicit values win
    ("cpu", False, True, None, None, True, True),
    ("cpu", True, None, True, None, True, True),
    ("cpu", True, None, False, None, False, False),  # use_cpu turned off on a CPU: float32, which transformers allows
    ("cpu", True, True, False, None, True, False),  # both given: kept (transformers' refusal becomes one line)
    ("cpu", True, None, None, True, False, True),  # fp16 asked for: no bf16 with it
    ("cuda", True, None, None, None, True, False),
    ("cuda", False, None, None, None, False, False),  # a GPU without bf16: float32, not TRL's refused default
    ("cuda", True, False, None, None, False, False),
    ("cuda", True, None, None, True, False, False),
]


@pytest.mark.parametrize("device, native, bf16, use_cpu, fp16, expected_bf16, expected_use_cpu", PRECISION_TABLE)
def test_training_precision_follows_the_table(device, native, bf16, use_cpu, fp16, expected_bf16, expected_use_cpu):
    assert training_precision(device, native, bf16, use_cpu, fp16) == (expected_bf16, expected_use_cpu)


@pytest.mark.parametrize("native", [True, False])
def test_sft_parser_applies_the_precision_choice_on_this_cpu(monkeypatch, tmp_path, native):
    # This machine has no GPU: the parser's rows are the table's "cpu" rows, and transformers accepts each of them.
    monkeypatch.setattr("peft_parscale.sft.bf16_is_native", lambda device: native and device == "cpu")
    monkeypatch.setattr("torch.accelerator.is_available", lambda: False)

    def parsed(*argv):
        training_args = make_parser().parse_args_and_config(["--output_dir", str(tmp_path), *argv])[1]
        return training_args.bf16, training_args.use_cpu

    assert parsed() == (native, True)
    assert parsed("--bf16", "false") == (False, True)
    assert parsed("--use_cpu", "false") == (False, False)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"bf16": not native}))  # a --config file's value counts as given
    assert parsed("--config", str(config)) == (not native, True)


def sft(capsys, *argv) -> tuple[int, str, str]:
    """`parscale sft ARGV` in this process: its exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        parscale_main(["sft", *argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def local_run(tmp_path) -> list[str]:
    """Arguments that pass every check (nothing is loaded before the launch), with an output directory."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"text": "def f(x):\n    return x\n"}) + "\n")
    return ["--model_name_or_path", "org/model", "--dataset_name", str(tmp_path / "data")] + [
        "--output_dir",
        str(tmp_path / "out"),
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--P", "0"], "P (number of streams) must be an integer >= 1, got 0."),
        (["--P", "two"], "argument --P: invalid int value: 'two'"),
        (["--smoothing", "1.5"], "smoothing must be a number in [0, 1), got 1.5."),
        (["--peft", "none", "--use_peft"], "--use_peft selects TRL's LoRA, but --peft is 'none'."),
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
        (["--num_processes", "two"], "argument --num_processes/--num-processes: invalid int value: 'two'"),
        (["--config", "missing.yaml"], "No such file or directory: 'missing.yaml'"),
        (["--bf16", "true", "--use_cpu", "false"], "Your setup doesn't support bf16/gpu."),  # transformers' check
    ],
)
def test_a_bad_flag_is_one_line_and_exit_status_2_before_anything_is_launched(
    capsys, monkeypatch, local_run, tmp_path, flags, message
):
    launched = []
    monkeypatch.setattr("peft_parscale.sft.launch_command", launched.append)
    status, out, err = sft(capsys, *local_run, *flags)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("parscale sft: error: ") and message in err, err
    assert launched == [] and out == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset_name", "d", "--output_dir", "o"], "--model_name_or_path is required"),
        (["--model_name_or_path", "m", "--output_dir", "o"], "--dataset_name is required"),
        (["--model_name_or_path", "./no/model", "--dataset_name", "d"], "--model_name_or_path ./no/model: no such"),
        (["--model_name_or_path", "m", "--dataset_name", "/no/data"], "--dataset_name /no/data: no such file"),
    ],
)
def test_missing_model_or_data_is_one_line(capsys, monkeypatch, argv, message):
    monkeypatch.setattr("peft_parscale.sft.launch_command", lambda launch: pytest.fail("launched"))
    status, _, err = sft(capsys, *argv)
    assert status == 2 and err.count("\n") == 1 and message in err, err


def test_checked_flags_are_launched_with_the_precision_chosen(capsys, monkeypatch, local_run):
    launched = []
    monkeypatch.setattr("peft_parscale.sft.launch_command", launched.append)
    assert parscale_main(["sft", *local_run, "--P", "3", "--bf16", "false", "--num_processes", "1"]) == 0
    (launch,) = launched
    assert launch.module and launch.training_script == "peft_parscale.sft" and launch.num_processes == 1
    script = launch.training_script_args
    assert script[:-4] == [*local_run, "--P", "3", "--bf16", "false"]  # accelerate's flag is not the script's
    assert script[-4:] == ["--bf16", "False", "--use_cpu", "True"]  # this machine has no GPU
    assert "training on the CPU in float32" in capsys.readouterr().out


@pytest.mark.parametrize("compile_flags, regional", [([], False), (["--torch_compile", "true"], True)])
def test_torch_compile_is_launched_as_accelerate_s_regional_compilation(
    capsys, monkeypatch, local_run, tmp_path, compile_flags, regional
):
    """Also over an accelerate config file that turns regional compilation off, as `accelerate config` writes one:
    accelerate applies the file's values to every flag not given on the command line (`_validate_launch_command`,
    which its `launch_command` runs first; called here directly, since launching would start training)."""
    from accelerate.commands.launch import _validate_launch_command

    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: 'no'\nnum_processes: 1\n"
        "dynamo_config:\n  dynamo_backend: INDUCTOR\n  dynamo_use_regional_compilation: false\n"
    )
    launched = []
    monkeypatch.setattr("peft_parscale.sft.launch_command", launched.append)
    assert parscale_main(["sft", *local_run, *compile_flags, "--config_file", str(config)]) == 0
    (launch,) = launched
    validated, _, _ = _validate_launch_command(launch)
    assert validated.dynamo_use_regional_compilation is regional


def test_a_failed_training_process_ends_with_its_own_error_and_status(tmp_path):
    # The checks pass (the model directory exists), and the launched process fails loading it.
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"text": "x = 1\n"}) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "peft_parscale.cli", "sft", "--model_name_or_path", str(tmp_path / "empty-model")]
        + ["--dataset_name", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--report_to", "none"],
        check=False,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "CalledProcessError" not in result.stderr and "Traceback" in result.stderr  # the training process's own
    assert str(tmp_path / "empty-model") in result.stderr  # its error names what it could not load
    assert result.stderr.rstrip().endswith("parscale sft: training failed (exit status 1; its error is above).")


def test_parscale_alone_shows_usage_and_fails_and_version_prints(capsys):
    assert parscale_main([]) == 2
    assert "usage: parscale" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        parscale_main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == "parscale 0.1.0"


def test_sft_help_starts_with_what_a_newcomer_needs():
    text = make_parser(prog="parscale sft").format_help()
    head, _, trl_flags = text.partition("\noptions:\n")
    assert len(head.splitlines()) < 40 and len(trl_flags.splitlines()) > 300
    for flag in ["--P", "--prefix_length", "--peft", "--config", "--accelerate_config", "--num_processes"]:
        assert f"\n  {flag} " in head, flag
    assert (
        "--prefix_init            How new prefixes start: random, or the base model's keys/values of real text. "
        "(default: text)" in head
    )  # parscale sft's own default, not the config field's


def test_eval_prints_its_plan_and_checks_its_limits():
    humaneval = EvalArguments(
        model_name_or_path="m", tasks=["humaneval"], humaneval_problems=10, max_new_tokens=128, num_samples=4, k=[1, 4]
    )
    assert plan(humaneval) == (
        "HumanEval: 10 problems x 2 modes (completion, chat) x 4 samples (sampled at temperature 0.8) x up to 128 new "
        "tokens = 80 completions (--humaneval_problems, --num_samples, --max_new_tokens to change)"
    )
    assert "164 problems x 1 modes (completion) x 1 samples (greedy) x up to 512 new tokens = 164 completions" in plan(
        EvalArguments(model_name_or_path="m", tasks=["humaneval"], humaneval_modes=["completion"])
    )
    loss = EvalArguments(model_name_or_path="m", tasks=["loss"], dataset_name="data", seq_len=256, max_windows=16)
    assert plan(loss) == "held-out loss: the first 16 windows of 256 tokens of data (split test), 8 per batch"
    for bad, message in [
        ({"humaneval_problems": 0}, "--humaneval_problems must be at least 1"),
        ({"k": [1, 10]}, "pass@10 needs at least 10 samples per problem"),
        ({"humaneval_modes": ["completions"]}, "unknown HumanEval modes ['completions']"),
        ({"seq_len": 1}, "--seq_len must be at least 2"),
    ]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            EvalArguments(model_name_or_path="m", **bad)


def test_eval_limits_humaneval_to_the_first_problems(monkeypatch):
    from peft_parscale.eval import run_eval

    scored = []

    def evaluate_humaneval(model, tokenizer, mode, problems, **settings):
        scored.append((mode, [problem["task_id"] for problem in problems]))
        return {"num_samples": settings["num_samples"], "pass@1": 0.0}

    monkeypatch.setattr("peft_parscale.humaneval.evaluate_humaneval", evaluate_humaneval)
    args = EvalArguments(model_name_or_path="m", tasks=["humaneval"], humaneval_problems=3)
    run_eval(args, model=None, tokenizer=None)
    first_three = ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert scored == [("completion", first_three), ("chat", first_three)]


def test_local_data_a_jsonl_folder_and_a_saved_dataset(tmp_path):
    rows = {"train": ["a = 1\n", "b = 2\n"], "test": ["c = 3\n"]}
    (tmp_path / "jsonl").mkdir()
    for split, texts in rows.items():
        (tmp_path / "jsonl" / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    DatasetDict({split: Dataset.from_dict({"text": texts}) for split, texts in rows.items()}).save_to_disk(
        tmp_path / "saved"
    )
    Dataset.from_dict({"text": rows["train"]}).save_to_disk(tmp_path / "one-split")
    for folder in ("jsonl", "saved"):
        loaded = load_data(str(tmp_path / folder))
        assert {split: list(loaded[split]["text"]) for split in loaded} == rows, folder
        assert list(load_data(str(tmp_path / folder), split="test")["text"]) == rows["test"]
        streamed = load_data(str(tmp_path / folder), streaming=True)
        assert [row["text"] for row in streamed["train"]] == rows["train"]
    assert list(load_data(str(tmp_path / "one-split"))["train"]["text"]) == rows["train"]


def test_the_data_command_writes_a_jsonl_folder(tmp_path):
    from peft_parscale.data import main as data_main

    data_main([str(tmp_path / "laptop-data"), "--max_files", "3"])
    for split in ("train", "test"):
        lines = (tmp_path / "laptop-data" / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == 3 and all(json.loads(line)["text"] for line in lines)


def test_a_smoke_run_s_tiny_checkpoint_is_removed_when_the_process_exits(tmp_path):
    (tmp_path / "tmp").mkdir()
    code = "from peft_parscale.testing import temporary_tiny_checkpoint; print(temporary_tiny_checkpoint())"
    environment = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    checkpoint = Path(result.stdout.strip().splitlines()[-1])
    assert checkpoint.parent.parent == tmp_path / "tmp" and checkpoint.name == "tiny-qwen2"
    assert not checkpoint.parent.exists()


def test_get_peft_model_raises_no_future_warning(tmp_path):
    # FutureWarnings turned into errors: PEFT's read of transformers' deprecated `is_gradient_checkpointing` is silenced
    # by the package (its import installs the filter), nothing else is.
    code = (
        "import sys, peft_parscale\n"
        "from peft import get_peft_model\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft_parscale.testing import save_tiny_checkpoint\n"
        "model = AutoModelForCausalLM.from_pretrained(save_tiny_checkpoint(sys.argv[1]))\n"
        "get_peft_model(model, peft_parscale.ParScaleConfig(P=2, prefix_length=4))\n"
    )
    command = [sys.executable, "-W", "error::FutureWarning", "-c", code, str(tmp_path / "tiny")]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
