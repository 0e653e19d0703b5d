"""The benchmark script in its tiny CPU mode (what CI runs), and the model shapes it measures."""

import json
import math
import statistics
import threading

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from benchmarks import attention_accuracy, decoding, measure, plots, profiling, report, run, sampling, training
from benchmarks.measure import DeviceState
from benchmarks.records import variant_order
from benchmarks.shapes import QWEN25, SCALING_K, dense_equivalent, non_embedding_parameters, shape_config
from peft_parscale import ParScaleConfig

GREEDY_CASES = ("argmax", "greedy")  # the selector suite's greedy choices, apart from its sampling cases


def test_tiny_run_writes_results_report_and_comparison(tmp_path):
    suites = "env,targets,sweep,train,sampling,selector"
    modes = "generate,fast,fast_uncompiled,fast_heads_copied,fast_fused"
    assert run.main(["--tiny", "--suites", suites, "--sampling-modes", modes, "--out", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    suites = {record["suite"] for record in records}
    assert suites == {"env", "targets", "decode", "train", "sampling", "selector"}
    assert len({record["invocation"] for record in records}) == 1  # one call's records say so (ratios within a call)
    decode = [r for r in records if r["suite"] in ("targets", "decode")]
    assert {(r["variant"], r["mode"]) for r in decode if r["suite"] == "targets"} == {
        (variant, mode) for variant in ("stock", "P1", "P8") for mode in ("eager", "generate_static", "fast")
    }
    for record in decode:
        for key in ("prefill_ms", "total_ms"):  # timed directly
            assert math.isfinite(record[key]) and record[key] > 0, (key, record)
        # A difference of two medians (total minus prefill): on a busy CPU, at the tiny shape, it can come out below
        # zero, so only its presence is checked here; its meaning is a GPU measurement's (BENCHMARKS.md).
        assert math.isfinite(record["decode_ms_per_token"]), record
        if "tokens_vs_eager" in record:  # float32 on CPU: every path gives the eager path's greedy tokens
            assert record["tokens_vs_eager"]["equal"], record
        assert "device_state_runs" not in record  # a CPU has no GPU clock to read
    sampling = [r for r in records if r["suite"] == "sampling"]
    assert {(r["P"], r["mode"]) for r in sampling} == {(p, mode) for p in (1, 8) for mode in modes.split(",")}
    for record in sampling:
        assert record["batch"] == record["problems"] * record["samples_per_problem"] > record["problems"]
        assert record["completions_per_s"] == pytest.approx(record["batch"] / record["total_ms"] * 1e3)
        assert record["ttft_ms"] > 0
        if record["mode"] != "generate":  # the fused products ran where asked for, and only there
            assert record["fused_projections"] == (record["mode"] == "fast_fused"), record
        if record["mode"] == "generate":  # the first token is marked inside each timed run: before its end in each
            assert record["ttft_ms"] < record["total_ms"]
        # the fast modes time their prefills in calls of their own, which a busy CPU can slow more than the runs
    selector = {r["variant"]: r for r in records if r["suite"] == "selector" and r["variant"] not in GREEDY_CASES}
    assert set(selector) == {"selector_eager", "long_scan", "selector", "selector_dynamic", "selector_top_k"}
    for name in ("long_scan", "selector", "selector_dynamic", "selector_top_k"):  # inductor on CPU compiles every case
        assert selector[name]["compiled"] and selector[name]["ms_per_call"] > 0, selector[name]
    greedy = [r for r in records if r["suite"] == "selector" and r["variant"] in GREEDY_CASES]
    assert {(r["variant"], r["rows"]) for r in greedy} == {(name, rows) for name in GREEDY_CASES for rows in (1, 4)}
    assert all(r["compiled"] and r["ms_per_call"] > 0 and r["tokens_equal_fraction"] == 1.0 for r in greedy), greedy
    assert {r["timing"] for r in greedy} == {"call"}  # a CPU has no CUDA graph to time the kernels alone
    train = [r for r in records if r["suite"] == "train"]
    assert [r["P"] for r in train] == [1, 2]
    assert all(r["tokens_per_s"] > 0 and r["trainable_gradient_norm"] > 0 for r in train)
    # the attention a step ran, by name (on a CPU sdpa's operators, forward and backward)
    assert all(any("scaled_dot_product" in name for name in r["attention_kernels"]) for r in train), train
    # each trainable tensor's first-step gradient norm, by the model's own parameter names
    model, _ = decoding.build_variant("tiny", "P2", torch.device("cpu"), torch.float32)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert set(train[1]["gradient_norms"]) == trainable
    assert math.hypot(*train[1]["gradient_norms"].values()) == train[1]["trainable_gradient_norm"]
    report = (tmp_path / "report.md").read_text()
    sections = (
        "## Targets",
        "## Parallel vs parameter scaling",
        "## Decode sweep",
        "## Sampling throughput",
        "## Token choice compilation",
        "## Training",
    )
    for section in sections:
        assert section in report
    comparison = json.loads((tmp_path / "comparison.json").read_text())["devices"]["cpu"]
    assert {(c["shape"], c["P"]) for c in comparison["scaling_comparison"]} == {("tiny", 2)}


def scripted(values: list[float], after: threading.Event | None = None, calls: int = 0):
    """A reader returning `values` in turn (the last one from then on), setting `after` once it has been called
    `calls` times."""
    remaining, count = list(values), [0]

    def read() -> float:
        count[0] += 1
        if after is not None and count[0] >= calls:
            after.set()
        return remaining.pop(0) if len(remaining) > 1 else remaining[0]

    return read


def test_device_state_keeps_readings_taken_in_the_region_by_its_thread_and_at_the_end():
    """The reading taken as the region starts describes what ran before it and is dropped; the thread's readings and
    the one at the end are kept. The region waits (up to a minute, never on a busy CPU's timing) until the thread has
    read twice."""
    read_twice = threading.Event()
    readers = {
        "sm_mhz": scripted([345, 1980, 1755, 1830], read_twice, calls=3),
        "load_percent": scripted([0, 100, 62, 97]),
        "power_w": scripted([70.0, 310.0, 452.5, 300.0]),
        "temperature_c": scripted([30, 41, 44, 43]),
    }
    with DeviceState(torch.device("cpu"), interval_s=0.001, readers=readers) as state:
        assert read_twice.wait(60)
        state._stop.set()  # no further readings from the thread: the test knows which ones it took
        state._thread.join(60)
    # the thread took 1980 and 1755, the end 1830 (the last value repeats for any later call)
    clocks = [sample["sm_mhz"] for sample in state.samples]
    assert clocks[:2] == [1980, 1755] and set(clocks[2:]) == {1830} and 345 not in clocks
    summary = state.summary()
    assert summary["sm_mhz"] == [min(clocks), statistics.median(clocks), max(clocks)]
    assert summary["power_w_max"] == 452.5 and summary["temperature_c_max"] == 44
    assert summary["samples"] == len(clocks) and "error" not in summary


def test_device_state_drops_only_what_nvml_refuses_and_reads_torch_cuda(monkeypatch):
    """The CUDA readers are torch.cuda's NVML functions (power in milliwatts); one that fails, as pynvml's do for a
    query the runtime lacks, is named and left out, the others go on, and the timed region runs."""
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device: 1980)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda device: 312_500)
    monkeypatch.setattr(torch.cuda, "temperature", lambda device: 41)

    def unsupported(device: torch.device) -> int:
        raise OSError("Not Supported")

    monkeypatch.setattr(torch.cuda, "utilization", unsupported)
    ran = []
    with DeviceState(torch.device("cuda", 0), interval_s=3600.0) as state:
        ran.append(True)
    assert ran == [True]
    assert state.summary() == {
        "sm_mhz": [1980, 1980, 1980],
        "power_w_max": 312.5,
        "temperature_c_max": 41,
        "samples": 1,  # the end's: the start's is dropped, the thread's interval is longer than the region
        "error": "load_percent: OSError: Not Supported",
    }
    with DeviceState(torch.device("cpu")) as cpu:  # no readers on a CPU
        pass
    assert cpu.summary() == {}


def test_device_state_gives_up_on_a_reading_that_does_not_return():
    """A stalled NVML call holds up the reading thread only: leaving the region waits `join_timeout_s`, names it, and
    nothing is added afterwards."""
    release, calls = threading.Event(), []

    def stalls_after_the_first_call() -> float:  # the start's reading answers; the next one hangs
        calls.append(None)
        return 99 if len(calls) == 1 or release.wait(60) else 0

    readers = {"sm_mhz": scripted([1980]), "load_percent": stalls_after_the_first_call}
    state = DeviceState(torch.device("cpu"), interval_s=0.001, readers=readers, join_timeout_s=0.01)
    with state:
        pass
    release.set()
    state._thread.join(60)
    assert state.summary() == {"error": "thread: an NVML reading did not return within 0.01 s"}


def test_decode_table_shows_the_timed_runs_spread_and_the_gpu_state_when_read():
    """Records with the GPU's state get two more columns: the spread of their timed runs, and the lowest SM clock and
    the lowest of the runs' median loads (not the lowest load: a run's first readings average what ran before it); a
    record whose NVML reading failed names the error; tables of older records keep their columns."""
    case = {"shape": "0.5b", "mode": "fast", "batch": 1, "prompt": 128, "new_tokens": 512, "prefill_ms": 30.0}
    case |= {"decode_ms_per_token": 1.8, "total_ms": 950.0, "peak_mem_gib": 1.0}
    read = [
        {"sm_mhz": [1980, 1980, 1980], "load_percent": [97, 99, 100], "power_w_max": 300.0, "samples": 21},
        {"sm_mhz": [1650, 1900, 1980], "load_percent": [40, 98, 100], "power_w_max": 310.0, "samples": 23},
    ]
    states = {"total_ms_runs": [1000.0, 1130.0], "device_state_runs": read}
    failed = {"total_ms_runs": [950.0], "device_state_runs": [{"error": "NVMLError_NotSupported: Not Supported"}]}
    rows = [{**case, "variant": "P1", **states}, {**case, "variant": "P8", **failed}]
    lines = report.decode_table(rows).splitlines()
    assert lines[0].endswith("| timed runs' spread | SM MHz (lowest) / load % (lowest run median) |")
    # (1130 − 1000) / 1000; the lowest clock of both runs and the lower of their median loads (99, 98)
    assert lines[2].endswith(f"| {130 / 1000:.1%} | 1650 / 98 |")
    assert lines[3].endswith("| - | NVMLError_NotSupported: Not Supported |")
    older = report.decode_table([{**case, "variant": "P1", "total_ms_runs": [1000.0, 1130.0]}]).splitlines()
    assert older[0].endswith("| peak GiB |")


def decode_record(device: str, variant: str, ms_per_token: float) -> dict:
    case = {"suite": "targets", "shape": "1.5b", "mode": "fast", "batch": 1, "prompt": 64, "new_tokens": 128}
    times = {"prefill_ms": 1.0, "total_ms": 1.0, "peak_mem_gib": 1.0}
    return {**case, **times, "device_name": device, "variant": variant, "decode_ms_per_token": ms_per_token}


def test_report_keeps_each_device_apart(tmp_path):
    """A later run on another GPU neither replaces an earlier device's case nor is paired with it: the H200 has no
    P=1 record, so no ratio may be formed for it (pairing its P=8 with the H100's P=1 would give 2.0 / 1.0)."""
    records = [
        decode_record("NVIDIA H100", "P1", 1.0),
        decode_record("NVIDIA H100", "P8", 1.1),
        decode_record("NVIDIA H200", "P8", 2.0),
    ]
    markdown = report.write_report(records, str(tmp_path))
    h100, h200 = markdown.split("## NVIDIA H100")[1].split("## NVIDIA H200")
    assert "| 1.5b | P8 | fast | 1 | 64+128 | 1.00 | 1.10 |" in h100 and "2.00" not in h100
    assert "| 1.5b | P8 | fast | 1 | 64+128 | 1.00 | 2.00 |" in h200 and "P1" not in h200
    checks = json.loads((tmp_path / "comparison.json").read_text())["devices"]
    (h100_ratio,) = [c for c in checks["NVIDIA H100"]["targets"] if c["target"].startswith("decode ms/token")]
    assert h100_ratio["value"] == pytest.approx(1.1)
    assert not [c for c in checks["NVIDIA H200"]["targets"] if c["target"].startswith("decode ms/token")]
    assert report.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_report_takes_each_ratio_from_one_call():
    """A later call that measured P=8 alone (run AC measured levers at P=1 and P=8 but not the base model at batch 8)
    neither pairs its P=8 with an earlier call's P=1 or base model: each ratio comes from the latest call that
    measured both sides (here the first: 1.1 / 1.0 and 1.1 / 2.0; pairing across calls would give 3.0 and 1.5)."""
    first = [
        decode_record("NVIDIA H100", "P1", 1.0),
        decode_record("NVIDIA H100", "P8", 1.1),
        {**decode_record("NVIDIA H100", "stock", 2.0), "batch": 8},
    ]
    later = [decode_record("NVIDIA H100", "P8", 3.0)]
    records = [{**r, "invocation": "first"} for r in first] + [{**r, "invocation": "later"} for r in later]
    _, checks = report.target_checks(records)
    values = {c["target"]: c["value"] for c in checks}
    assert values["decode ms/token P=8 / P=1 (fast)"] == pytest.approx(1.1)
    assert values["fast P=8 / stock batch 8 (fast) ms/token"] == pytest.approx(0.55)
    assert values["fast path P=8 ms/token"] == 3.0  # the latest measurement of the case itself


def test_decode_plot_draws_only_lengths_measured_with_the_base_model(tmp_path, monkeypatch):
    """The decode-latency plot starts each line at the base model (P = 1): a length where only arms were measured
    (here, more often than the base model's) gives no panel, and a shape without the base model none at all."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    def sweep(shape: str, variant: str, prompt: int, new_tokens: int, ms_per_token: float) -> dict:
        case = {"suite": "decode", "shape": shape, "mode": "fast", "batch": 1, "prompt": prompt}
        times = {"prefill_ms": 1.0, "total_ms": 1.0, "peak_mem_gib": 1.0, "decode_ms_per_token": ms_per_token}
        return {**case, **times, "new_tokens": new_tokens, "variant": variant, "device_name": "NVIDIA H100"}

    records = [sweep("0.5b", "stock", 64, 64, 1.0), sweep("0.5b", "P8", 64, 64, 1.1)]
    records += [sweep("0.5b", variant, 128, 512, 2.0) for variant in ("P2", "P4", "P1T192")]
    records += [sweep("1.5b", "P2", 64, 64, 3.0)]
    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda axis, title, *a, **k: titles.append(title))
    written = plots.write_plots(records, [], str(tmp_path))
    assert [path for path in written if path.endswith("decode_latency.png")]
    assert titles == ["Qwen2.5-0.5b shape, 64+64 tokens"]


def test_training_variants_are_the_experiment_s_arms(tmp_path):
    """A longer prefix and LoRA train in the training suite as the HumanEval experiment's arms do, with their own
    trainable parameters and model FLOPs. Tiny shape: hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 key/value
    heads (32 wide); 32 tokens per step."""
    argv = ["--tiny", "--suites", "train", "--train-variants", "P1,P1T8,lora", "--no-report", "--out", str(tmp_path)]
    assert run.main(argv) == 0
    records = {r["variant"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert [(records[v]["P"], records[v]["prefix_length"]) for v in ("P1", "P1T8", "lora")] == [(1, 48), (1, 8), (1, 0)]
    # a prefix: keys and values, 2 heads of 16, T positions, in each of 2 layers
    assert records["P1T8"]["trainable_parameters"] == 2 * 2 * (2 * 16) * 8
    # LoRA, rank 16, on q (64 -> 64), k and v (64 -> 32), o (64 -> 64), gate and up (64 -> 128), down (128 -> 64)
    lora_sizes = (64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64)
    assert records["lora"]["trainable_parameters"] == 2 * 16 * lora_sizes
    # its FLOPs against P1T8's: no prefix keys (8 fewer visible per query: 4 FLOPs each per head dimension, forward
    # and backward twice), plus the low-rank products (forward 2·r·(in + out), backward twice that)
    attention = 3 * 4 * 2 * 4 * 16 * 8 * 32
    low_rank = 6 * 16 * 2 * lora_sizes * 32
    difference = records["lora"]["model_tflop_per_step"] - records["P1T8"]["model_tflop_per_step"]
    assert difference * 1e12 == pytest.approx(low_rank - attention, rel=1e-9)
    assert all(r["tokens_per_s"] > 0 and r["trainable_gradient_norm"] > 0 for r in records.values())
    with pytest.raises(ValueError, match="Unknown training variant"):
        run.main(["--tiny", "--suites", "train", "--train-variants", "P1x", "--no-report", "--out", str(tmp_path)])


def test_the_training_suite_initialises_adapters_at_the_std_asked_for(tmp_path, monkeypatch):
    """`--train-init-std` reaches the adapter the timed steps train, and its record says so; without it the record
    gives the config's default. LoRA, which has no such setting, and a std that is not positive are refused before
    anything runs."""
    configs = []
    make_adapter_model = training.get_peft_model
    monkeypatch.setattr(
        training, "get_peft_model", lambda model, config: configs.append(config) or make_adapter_model(model, config)
    )
    argv = ["--tiny", "--suites", "train", "--train-P", "2", "--no-report", "--out", str(tmp_path)]
    assert run.main([*argv, "--train-init-std", "0.5"]) == 0
    assert configs[-1].init_std == 0.5
    assert run.main(argv) == 0
    assert configs[-1].init_std == 0.02
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["init_std"] for r in records] == [0.5, 0.02]
    for refused in (["--train-variants", "P2,lora", "--train-init-std", "0.5"], ["--train-init-std", "0"]):
        with pytest.raises(SystemExit):
            run.main([*argv, *refused])
    assert len(records) == len((tmp_path / "results.jsonl").read_text().splitlines())


def test_a_sampling_mode_that_fails_is_recorded_and_the_others_still_run(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no code generated")

    monkeypatch.setattr(sampling, "measure_fast_sampling", fail)
    records = []
    workload = {"problems": 1, "samples": 2, "prompt": 4, "new_tokens": 3}
    device, dtype = torch.device("cpu"), torch.float32
    common = {"modes": ["fast", "generate"], "device": device, "dtype": dtype, "repeats": 1, "emit": records.append}
    sampling.sampling_throughput("tiny", ["P1"], **workload, **common)
    assert [(r["mode"], r.get("error")) for r in records] == [
        ("fast", "RuntimeError: no code generated"),
        ("generate", None),
    ]
    assert records[1]["completions_per_s"] > 0
    with pytest.raises(ValueError, match="Unknown sampling modes"):
        sampling.sampling_throughput("tiny", ["P1"], **workload, **{**common, "modes": ["fastest"]})


def test_the_compile_levers_give_eager_greedy_tokens(tmp_path, monkeypatch):
    """The fast path's decode step compiled with inductor's freezing and max-autotune (`FAST_MODE_OPTIONS`) is
    compiled on the CPU too, in float32, where greedy tokens of a correct path equal eager `generate`'s (logit gaps
    at the tiny shape are far above float32's reassociation differences, as in the tiny run above)."""
    compile_calls = []
    compile = torch.compile

    def recording_compile(function, **options):
        compile_calls.append(options)
        return compile(function, **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    modes = ["eager", *decoding.FAST_MODE_OPTIONS]
    argv = ["--tiny", "--suites", "targets", "--variants", "P2", "--batches", "1", "--repeats", "3", "--no-report"]
    assert run.main([*argv, "--target-modes", ",".join(modes), "--out", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in records] == modes
    assert compile_calls == list(decoding.FAST_MODE_OPTIONS.values())  # each lever compiled the step its own way
    for record in records[1:]:
        assert record["tokens_vs_eager"]["equal"], record
        # every timed run is kept, and the reported total is their median
        assert len(record["total_ms_runs"]) == 3 and record["total_ms"] == statistics.median(record["total_ms_runs"])
        # each lever asks for CUDA graphs, which a CPU step cannot have: inductor counts that as a skip
        assert record["cudagraph_skips"] >= 1, record
    with pytest.raises(SystemExit):  # a misspelt mode would otherwise be measured as `generate`
        run.parse_args(["--out", str(tmp_path), "--target-modes", "eager,fast_frozn"])


def test_the_fused_and_compiled_prefill_modes_give_eager_greedy_tokens(tmp_path, monkeypatch):
    """`fast_fused` (the stacked products) and `fast_prefill` (the prompts' forward pass compiled too) go through
    `fast_generate`'s options and, compiled on the CPU in float32, give eager `generate`'s greedy tokens (as above);
    `fast_prefill` compiles the prefill with `PREFILL_COMPILE_OPTIONS`, and nothing else does."""
    compile_calls = []
    compile = torch.compile

    def recording_compile(function, **options):
        compile_calls.append((function.__name__, options))
        return compile(function, **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    modes = ["eager", decoding.FUSED_MODE, decoding.PREFILL_MODE]
    argv = ["--tiny", "--suites", "targets", "--variants", "P2", "--batches", "1", "--repeats", "1", "--no-report"]
    assert run.main([*argv, "--target-modes", ",".join(modes), "--out", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in records] == modes
    assert all(record["tokens_vs_eager"]["equal"] for record in records[1:]), records
    assert records[1]["fused_groups"] == 2 * shape_config("tiny").num_hidden_layers
    assert "fused_groups" not in records[2]
    # on the CPU the step is not compiled (as in `fast`), the prefill is, once, with its own options
    assert compile_calls == [("forward_prompts", decoding.PREFILL_COMPILE_OPTIONS)]


def test_profile_suite_writes_training_decoding_and_sampling_tables(tmp_path, monkeypatch):
    """Each table profiles the step it names; on CPU the compiled layers run inductor's CPU kernels. Every row is
    listed here: which ops make the 30 costliest depends on how busy the CPU is (aten::sort, which top-p runs, fell out
    of the sampling table's 30 on a loaded machine), and what a step runs does not."""
    monkeypatch.setattr(profiling, "TABLE_ROWS", 10_000)
    assert run.main(["--tiny", "--suites", "profile", "--no-report", "--out", str(tmp_path)]) == 0
    for name in profiling.PROFILES:
        table = (tmp_path / f"profile_{name}.txt").read_text()
        assert table.startswith("Self time by family (CPU ops;"), name
        # the Trainer's table need not hold one: its compiled layers hide theirs and TRL's LM head multiplies with
        # aten::mm (what it profiled is checked below instead)
        assert name == "training_P8_trainer" or "aten::linear" in table, name
    # the compiled-layers tables profile compiled layers, the eager one none
    for name in ("training_P8_layers", "training_P8_trainer"):
        assert "Torch-Compiled Region" in (tmp_path / f"profile_{name}.txt").read_text(), name
    assert "Torch-Compiled Region" not in (tmp_path / "profile_training_P8.txt").read_text()
    # the Trainer's table profiles the Trainer's step: TRL's fused LM head and the optimizer, which the plain step,
    # forward and backward alone, never runs
    trainer = (tmp_path / "profile_training_P8_trainer.txt").read_text()
    plain = (tmp_path / "profile_training_P8_layers.txt").read_text()
    assert "ChunkedLogProbFunction" in trainer and "Optimizer.step" in trainer
    assert "ChunkedLogProbFunction" not in plain and "Optimizer.step" not in plain
    # the sampling table profiles the sampling step: top-p sorts the scores, which greedy decoding never does
    assert "aten::sort" in (tmp_path / "profile_sampling_P8.txt").read_text()
    assert "aten::sort" not in (tmp_path / "profile_decode_P8.txt").read_text()

    # the fused decode table profiles the fused step: of a layer's 7 products, q/k/v run as one and gate/up as one
    def linear_calls(name: str) -> int:
        (row,) = [
            line for line in (tmp_path / f"profile_{name}.txt").read_text().splitlines() if "aten::linear " in line
        ]
        return int(row.split()[-1])

    # 3 fewer products a layer in every forward pass (prefill and each new token)
    forwards = (linear_calls("decode_P8") - linear_calls("decode_P8_fused")) / (
        3 * shape_config("tiny").num_hidden_layers
    )
    assert forwards == int(forwards) > 0


def test_profiles_picks_the_tables(tmp_path):
    """`--profiles` writes only the tables it names, so a short device call can profile one step."""
    only = ["--profiles", "training_P8_layers"]
    assert run.main(["--tiny", "--suites", "profile", *only, "--no-report", "--out", str(tmp_path)]) == 0
    assert sorted(path.name for path in tmp_path.glob("profile_*")) == ["profile_training_P8_layers.txt"]
    with pytest.raises(SystemExit):
        run.parse_args(["--out", str(tmp_path), "--profiles", "training_P9"])


def test_kernel_families_by_name():
    """Real kernel names (CUDA: flash and memory-efficient attention, cuBLAS, ATen, inductor) and CPU op names."""
    expected = {
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, "
        "cutlass::bfloat16_t>>": "attention",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
        "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT": "matrix products",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matrix products",
        "aten::addmm": "matrix products",
        "aten::mm": "matrix products",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::Epilogue>": (
            "softmax and loss"
        ),
        "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": (
            "softmax and loss"
        ),
        "triton_red_fused__softmax_0": "softmax and loss",
        "void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float, 4>>": "optimizer",
        "triton_poi_fused__to_copy_add_mul_0": "fused by torch.compile",
        "Memcpy DtoD (Device -> Device)": "copies and fills",
        "aten::copy_": "copies and fills",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "copies and fills",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": (
            "other element-wise and reductions"
        ),
        "aten::gelu": "other element-wise and reductions",
    }
    assert {name: measure.kernel_family(name) for name in expected} == expected


def test_family_times_count_every_op_once_on_a_cpu():
    """On a CPU the families split the ops' self times: together they are the profile's whole self time."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    inputs = torch.randn(16, 32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        model(inputs).softmax(-1).sum().backward()
    averages = profiler.key_averages()
    times, what = profiling.family_times(averages)
    assert what == "CPU ops"
    whole = sum(event.self_cpu_time_total for event in averages)
    assert sum(times.values()) == pytest.approx(whole, rel=1e-9)  # only the order of a float sum differs
    assert times["matrix products"] > 0 and times["softmax and loss"] > 0 and times["attention"] == 0


@pytest.mark.parametrize("shape", sorted(QWEN25))
def test_non_embedding_parameters_match_the_model(shape):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(shape))
    embedding = model.get_input_embeddings().weight.numel()  # tied with the LM head
    assert non_embedding_parameters(model.config) == sum(p.numel() for p in model.parameters()) - embedding


@pytest.mark.parametrize("shape", sorted(QWEN25))
@pytest.mark.parametrize("num_streams", [2, 4, 8])
def test_dense_equivalent_has_the_law_s_parameter_count(shape, num_streams):
    base, dense = shape_config(shape), dense_equivalent(shape, num_streams)
    ratio = non_embedding_parameters(dense) / non_embedding_parameters(base)
    assert ratio == pytest.approx(1 + SCALING_K * math.log(num_streams), rel=5e-3)
    assert (dense.hidden_size, dense.vocab_size) == (base.hidden_size, base.vocab_size)  # same embedding


@pytest.mark.parametrize(
    "variant, streams, prefix_length", [("P1T12", 1, 12), ("P2T3", 2, 3), ("P4", 4, ParScaleConfig().prefix_length)]
)
def test_variants_name_the_streams_and_the_prefix_length(variant, streams, prefix_length):
    model, info = decoding.build_variant("tiny", variant, torch.device("cpu"), torch.float32)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    # prefix keys and values: layers × 2 × P × kv heads × T × head_dim; the aggregator: (P·H)·H + H + H·P + P
    prefixes = config.num_hidden_layers * 2 * streams * config.num_key_value_heads * prefix_length * head_dim
    hidden = config.hidden_size
    aggregator = streams * hidden * hidden + hidden + hidden * streams + streams if streams > 1 else 0
    assert (info["P"], info["prefix_length"], info["adapter_params"]) == (streams, prefix_length, prefixes + aggregator)
    assert variant_order("stock") < variant_order("P1") < variant_order("P1T12")
    assert variant_order("P1T384") < variant_order("P2") < variant_order("dense_P2")


def test_laptop_measurement_runs_the_readme_block_and_the_same_eval_without_the_adapter():
    from benchmarks import laptop

    block = laptop.readme_block(laptop.LAPTOP_SECTION)
    assert "parscale sft" in block and "--adapter laptop-p2" in block
    assert laptop.base_model_line(block) == (
        "parscale eval --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --tasks loss --dataset_name "
        "laptop-data --seq_len 256 --max_windows 16 --batch_size 4"
    )


def test_cpu_precision_times_both_precisions_on_the_given_model(tmp_path):
    from benchmarks import cpu_precision
    from peft_parscale.testing import save_tiny_checkpoint

    timings = cpu_precision.time_forward(str(save_tiny_checkpoint(tmp_path / "tiny")), 2, 8, repeats=2)
    assert timings["model"] == str(tmp_path / "tiny") and isinstance(timings["native_bf16"], bool)
    for precision in ("bfloat16_autocast", "float32"):
        assert len(timings[precision]) == 2 and all(seconds > 0 for seconds in timings[precision])


def test_training_under_regional_compilation_computes_what_eager_computes(tmp_path):
    """The training suite's "regions" mode (accelerate's `compile_regions`, as ``parscale sft --torch_compile true``
    trains): the first step's loss and adapter gradient norm are eager's. float32 on the CPU, where inductor's
    reordered sums differ by about 1e-7 relative, far below the 1e-5 bound."""
    argv = ["--tiny", "--suites", "train", "--train-P", "2", "--train-compile", "none,regions", "--no-report"]
    assert run.main([*argv, "--out", str(tmp_path)]) == 0
    eager, regions = map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())
    assert (eager["compile"], regions["compile"]) == ("none", "regions")
    for key in ("loss", "trainable_gradient_norm"):
        assert regions[key] == pytest.approx(eager[key], rel=1e-5), key


def test_trainer_loops_train_what_the_plain_step_trains(tmp_path):
    """The train_loops suite takes the same step through `ParScaleSFTTrainer`, with TRL's loss (its fused LM head,
    which never builds the logits) and with the model's own cross-entropy: two implementations of one loss over the
    same rows in the same order from the same adapter, so their mean training losses agree. float32 on the CPU:
    TRL's tiled log-sum-exp and the full softmax round differently, by about 1e-7 relative, far below the 1e-5 bound.
    The plain loop's first-step loss is the same model on other rows, so it only bounds the scale (ln of the tiny
    vocabulary of 512, about 6.2, for a random model)."""
    argv = ["--tiny", "--suites", "train_loops", "--train-P", "2", "--no-report", "--out", str(tmp_path)]
    assert run.main([*argv, "--train-loops", "plain,trainer,trainer_model_loss"]) == 0
    records = {r["loop"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert list(records) == ["plain", "trainer", "trainer_model_loss"]
    assert all(r["suite"] == "train_loops" and r["step_ms"] > 0 for r in records.values())
    trainer, model_loss = records["trainer"], records["trainer_model_loss"]
    assert trainer["mean_train_loss"] == pytest.approx(model_loss["mean_train_loss"], rel=1e-5)
    assert trainer["mean_train_loss"] == pytest.approx(records["plain"]["loss"], rel=0.1)
    lines = len((tmp_path / "results.jsonl").read_text().splitlines())
    with pytest.raises(SystemExit, match="compile the layers in place"):  # refused before the plain loop is measured
        run.main([*argv, "--train-loops", "plain,trainer", "--train-compile", "regions"])
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == lines
    with pytest.raises(ValueError, match="compile the layers in place"):
        training.train_throughput(
            "tiny", "P2", 16, 1, torch.device("cpu"), torch.float32, steps=2, warmup=1, gradient_checkpointing=False,
            compile="regions", loop="trainer",
        )  # fmt: skip
    with pytest.raises(SystemExit):
        run.parse_args(["--out", str(tmp_path), "--train-loops", "trainer,eager"])


def test_scaling_comparison_takes_its_three_records_from_one_call():
    def record(call, variant, ms, memory=1.0):
        return {
            "suite": "decode",
            "mode": "fast",
            "invocation": call,
            "shape": "tiny",
            "batch": 1,
            "prompt": 4,
            "new_tokens": 4,
            "variant": variant,
            "total_ms": ms,
            "decode_ms_per_token": ms / 4,
            "peak_mem_gib": memory,
            "non_embedding_params": 127 if variant.startswith("dense") else 100,
        }

    records = [
        record("A", "stock", 10.0), record("B", "P2", 12.0), record("B", "dense_P2", 20.0),  # P=2 across calls
        record("C", "stock", 30.0), record("C", "P4", 33.0), record("C", "dense_P4", 40.0, memory=2.0),
        record("D", "P4", 99.0), record("D", "dense_P4", 99.0),  # later, without a base model beside them
    ]  # fmt: skip
    comparisons = report.scaling_comparison(records)
    assert [(c["P"], c["lengths"]) for c in comparisons] == [(4, "4+4")]  # no P=2: its base model ran elsewhere
    (c,) = comparisons
    assert (c["total_ms_base"], c["total_ms_parscale_increase"], c["total_ms_dense_increase"]) == (30.0, 3.0, 10.0)
    assert (c["peak_mem_gib_parscale_increase"], c["peak_mem_gib_dense_increase"]) == (0.0, 1.0)


def causal_sdpa_calls(monkeypatch) -> list[tuple[int, int]]:
    """(query length, key length) of each `is_causal` sdpa call `padded_prefix_sdpa` makes (its fallback, transformers'
    sdpa attention, passes the bias instead), so that a test sees the padded path taken."""
    from benchmarks import padded_attention

    calls, sdpa = [], padded_attention.scaled_dot_product_attention

    def counting(query, key, *args, **kwargs):
        if kwargs.get("is_causal"):
            calls.append((query.shape[2], key.shape[2]))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(padded_attention, "scaled_dot_product_attention", counting)
    return calls


def test_padded_prefix_attention_is_the_lower_right_causal_attention(monkeypatch):
    """`padded_prefix_sdpa` (queries padded in front, sdpa's upper-left `is_causal`) against the attention written out
    here: softmax over each query's visible keys, query i of S seeing keys 0..T+i of T + S, with grouped key/value
    heads. float64, so both sides agree to rounding (about 1e-15), far below the 1e-10 bound; the gradients of query,
    key and value too, since the dropped padding rows must pass none back."""
    from benchmarks.padded_attention import padded_prefix_sdpa
    from peft_parscale.layer import prefix_causal_bias

    batch, heads, key_value_heads, prefix, length, head_dim = 2, 4, 2, 3, 5, 8
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    query = tensor(batch, heads, length, head_dim)
    key, value = (
        tensor(batch, key_value_heads, prefix + length, head_dim),
        tensor(batch, key_value_heads, prefix + length, head_dim),
    )
    module = torch.nn.Module()
    module.num_key_value_groups = heads // key_value_heads
    calls = causal_sdpa_calls(monkeypatch)
    output, _ = padded_prefix_sdpa(module, query, key, value, prefix_causal_bias(length, prefix), scaling=0.5)

    expected = torch.empty(batch, length, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // key_value_heads)
            for i in range(length):
                visible = prefix + i + 1
                weights = torch.softmax(0.5 * key[b, kv, :visible] @ query[b, h, i], dim=0)
                expected[b, i, h] = weights @ value[b, kv, :visible]
    assert calls == [(prefix + length, prefix + length)] and output.shape == expected.shape
    assert torch.allclose(output, expected, atol=1e-10, rtol=0)
    upstream = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    gradients = torch.autograd.grad((output * upstream).sum(), (query, key, value))
    expected_gradients = torch.autograd.grad((expected * upstream).sum(), (query, key, value))
    for got, want in zip(gradients, expected_gradients):
        assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_training_with_padded_prefix_attention_computes_what_the_bias_computes(tmp_path, monkeypatch):
    """The training suite's first step with the prefix attention through padded queries (`padded`: any kernel;
    `padded_flash`: sdpa's flash kernel, which the CPU has too) gives the lower-right bias's loss and adapter gradient
    norm, each record through its own path. float32 on the CPU: the kernels may sum in another order (about 1e-7
    relative), hence the 1e-5 bound; a wrong mask (upper-left alignment, one key too many or too few) moved the
    gradient norm by 4e-4 relative or more when tried while writing this test."""
    argv = ["--tiny", "--suites", "train", "--train-P", "2", "--no-report", "--out", str(tmp_path)]
    calls = causal_sdpa_calls(monkeypatch)
    for attention in ("bias", "padded", "padded_flash"):
        calls.clear()
        assert run.main([*argv, "--train-attention", attention]) == 0
        assert bool(calls) == (attention != "bias") and all(queries == keys > 1 for queries, keys in calls), attention
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["attention"] for r in records] == ["bias", "padded", "padded_flash"]
    bias = records[0]
    for record in records[1:]:
        for key in ("loss", "trainable_gradient_norm"):
            assert record[key] == pytest.approx(bias[key], rel=1e-5), (record["attention"], key)
    # settings where the padding would silently not be measured are refused before anything runs
    for refused in (
        ["--suites", "train_loops", "--train-loops", "plain,trainer", "--train-attention", "bias,padded_cudnn"],
        ["--suites", "train_masks", "--train-attention", "padded"],
        ["--train-compile", "model", "--train-attention", "padded_flash"],
    ):
        with pytest.raises(SystemExit, match="padded"):
            run.main([*argv, *refused])
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    with pytest.raises(SystemExit):
        run.parse_args(["--out", str(tmp_path), "--train-attention", "padded_math"])


def test_another_flash_attention_is_put_in_place_for_the_block_only():
    """`flash_attention_impl` activates torch's registered implementation for the block and restores FlashAttention-2
    after it, also when the block raises; an implementation torch does not list, or whose kernels are missing (torch
    imports FA4's from flash-attn-4 when it is activated), is refused with nothing left in place."""
    from torch.nn import attention as torch_attention

    removed = []

    class Handle:
        def remove(self) -> None:
            removed.append(True)

    def missing_kernels():
        raise ModuleNotFoundError("No module named 'flash_attn'")

    torch_attention.register_flash_attention_impl("parscale-test-impl", register_fn=Handle)
    torch_attention.register_flash_attention_impl("parscale-test-missing", register_fn=missing_kernels)
    with training.flash_attention_impl("parscale-test-impl"):
        assert torch_attention.current_flash_attention_impl() == "parscale-test-impl" and removed == []
    assert torch_attention.current_flash_attention_impl() is None and removed == [True]
    with pytest.raises(KeyError), training.flash_attention_impl("parscale-test-impl"):
        raise KeyError("the step failed")
    assert torch_attention.current_flash_attention_impl() is None and removed == [True, True]
    missing = "needs its kernels installed: No module named 'flash_attn'"
    with pytest.raises(RuntimeError, match=missing), training.flash_attention_impl("parscale-test-missing"):
        pass
    with (
        pytest.raises(RuntimeError, match="lists no FlashAttention implementation 'FA9'"),
        training.flash_attention_impl("FA9"),
    ):
        pass
    assert torch_attention.current_flash_attention_impl() is None


def test_flash_attention_4_is_refused_where_it_would_not_be_timed(tmp_path):
    """`bias_fa4` replaces the flash kernel that only the lower-right bias reaches, for CUDA tensors: with the mask
    materialised or the whole model compiled, and on the CPU, it is refused before anything runs; the Trainer's loops
    take it (the replacement is the dispatcher's, not the loop's)."""
    conflict = training.training_setting_conflict
    assert conflict("bias_fa4", "lower_right", "layers", "trainer", torch.bfloat16) is None
    assert "bias_fa4" in conflict("bias_fa4", "materialised", "none", "plain", torch.bfloat16)
    assert "bias_fa4" in conflict("bias_fa4", "lower_right", "model", "plain", torch.bfloat16)
    assert training.flash_attention_impl_missing("bias", torch.device("cpu")) is None
    argv = ["--tiny", "--suites", "train", "--train-P", "2", "--no-report", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="replaces CUDA kernels only: on cpu"):
        run.main([*argv, "--train-attention", "bias,bias_fa4"])
    assert not (tmp_path / "results.jsonl").exists()


def test_the_attention_accuracy_check_finds_sdpa_exact_and_a_misaligned_mask_wrong(monkeypatch, tmp_path):
    """The accuracy suite's kernel (sdpa with the lower-right bias, float32 on the CPU) against its float64 reference,
    the attention written out: every tensor within 1e-5 relatively, a bound from float32's rounding (6e-8) over sums of
    at most 20 keys and 8 dimensions, with room. The check can fail: the same sdpa with the causal mask aligned to the
    upper left, as a kernel that mishandled the prefix would, is off by more than 10% in the prefix's key gradients."""
    argv = ["--tiny", "--suites", "attention_accuracy", "--no-report", "--out", str(tmp_path)]
    run.main(argv)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["attention"], r["sharpness"]) for r in records] == [("bias", s) for s in attention_accuracy.SHARPNESS]
    for record in records:
        assert set(record["relative_error"]) == set(attention_accuracy.TENSORS)
        assert max(record["relative_error"].values()) < 1e-5, record
        assert record["forward_backward_ms"] > 0
        # what ran is named: sdpa's CPU flash kernel, forward and backward, not the written-out reference's matmuls
        assert {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm"} & set(record["kernels"]) == {
            "aten::_scaled_dot_product_flash_attention_for_cpu"
        }, record["kernels"]

    monkeypatch.setattr(attention_accuracy, "causal_lower_right", torch.nn.attention.bias.causal_upper_left)
    misaligned = attention_accuracy.attention_errors("bias", 1, 2, 16, 4, 8, 4.0, torch.device("cpu"), torch.float32)
    assert misaligned["relative_error"]["key_grad_prefix"] > 0.1
    with pytest.raises(SystemExit, match="bias's kernels only, not 'padded'"):
        run.main([*argv, "--train-attention", "bias,padded"])
    with pytest.raises(SystemExit, match="replaces CUDA kernels only: on cpu"):
        run.main([*argv, "--train-attention", "bias_fa4"])


def test_padded_prefix_attention_passes_other_masks_on_and_restores_the_model(monkeypatch):
    """An explicit mask (a padded or packed batch) goes to transformers' sdpa attention unchanged, and the block
    switches the model's attention only while it lasts; a model whose attention is not sdpa is refused as it is."""
    from benchmarks.padded_attention import PADDED_PREFIX_SDPA, padded_prefix_attention

    calls = causal_sdpa_calls(monkeypatch)
    model = get_peft_model(AutoModelForCausalLM.from_config(shape_config("tiny")), ParScaleConfig(P=2))
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    padding = torch.tensor([[1] * 6, [0, 0] + [1] * 4])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=padding).logits
        with padded_prefix_attention(model):
            assert model.config._attn_implementation == PADDED_PREFIX_SDPA
            got = model(input_ids=ids, attention_mask=padding).logits
    assert calls == [] and torch.equal(got, expected)
    assert model.config._attn_implementation == "sdpa"
    eager = get_peft_model(AutoModelForCausalLM.from_config(shape_config("tiny", "eager")), ParScaleConfig(P=2))
    with pytest.raises(ValueError, match="'sdpa'"), padded_prefix_attention(eager):
        pass
    assert eager.config._attn_implementation == "eager"
