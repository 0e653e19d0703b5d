"""Every table of figures in README.md, RESULTS.md and BENCHMARKS.md is `doc_tables.py`'s rendering of the raw results
it reports: no figure in a table is typed by hand."""

from __future__ import annotations

import json
import shutil

import benchmark_tables
import doc_tables
import pytest
import results_tables
from table_format import RESULTS, ROOT

H100 = "NVIDIA H100 80GB HBM3"


def table_rows(monkeypatch, records: list[dict], name: str, **arguments: str) -> list[str]:
    """The rows under the header of benchmark table `name`, rendered with `records` as the whole records file."""
    monkeypatch.setattr(benchmark_tables, "load_records", lambda paths: records)
    return doc_tables.TABLES[name](**arguments).splitlines()[2:]


@pytest.mark.parametrize("document", doc_tables.DOCUMENTS, ids=lambda path: path.name)
def test_every_table_of_the_documents_is_its_rendering(document):
    assert doc_tables.stale_tables(document) == [], (
        f"{document.name} has stale tables: run `python -m tests.doc_tables write`"
    )


def test_every_table_is_used_and_every_marker_names_a_table():
    used = {match["name"] for path in doc_tables.DOCUMENTS for match in doc_tables.MARKER.finditer(path.read_text())}
    assert used == set(doc_tables.TABLES)
    with pytest.raises(KeyError, match="no table named 'nonsense'"):
        doc_tables.render("<!-- table:nonsense -->\n| x |\n<!-- /table -->")


def test_a_figure_typed_over_its_rendering_is_caught(tmp_path):
    # The check can fail: one digit of one figure changed in a rendered table makes that table, and only that, stale.
    results = ROOT / "RESULTS.md"
    text = results.read_text()
    start = text.index("<!-- table:stream-sweep -->")
    figure = text.index("| 1.3389 |", start)  # P=1's final held-out loss
    edited = tmp_path / "RESULTS.md"
    edited.write_text(text[:figure] + "| 1.3390 |" + text[figure + len("| 1.3389 |") :])
    assert doc_tables.stale_tables(edited) == ["stream-sweep"]


def test_records_of_another_device_leave_a_device_s_tables_as_they_are(monkeypatch):
    # The benchmark tables take one device's records (named in their marker): a new run elsewhere changes none of them.
    tables = {
        "benchmark-targets": {"runs": "B,C,E"},
        "benchmark-scaling": {},
        "benchmark-training": {"run": "C"},
        "benchmark-training-changes": {},
        "benchmark-sampling-attention": {},
    }

    def rendered() -> dict[str, str]:
        return {name: doc_tables.TABLES[name](device=H100, **arguments) for name, arguments in tables.items()}

    before = rendered()
    records = benchmark_tables.load_records([str(ROOT / "benchmarks" / "results" / "results.jsonl")])
    elsewhere = [
        {**record, "device_name": "another GPU", "tokens_per_s": 1.0, "decode_ms_per_token": 1.0}
        for record in records
        if record.get("device_name") == H100
    ]
    monkeypatch.setattr(benchmark_tables, "load_records", lambda paths: records + elsewhere)
    assert rendered() == before
    # ... and so does a later record of the same case with another attention, or in another run (the training table)
    compiled = [r for r in records if r.get("suite") == "train" and r.get("compile") == "layers"]
    run_C = next(r for r in compiled if (r["shape"], r["P"], r.get("run")) == ("1.5b", 8, "C"))
    padded = {**run_C, "tokens_per_s": 1.0, "attention": "padded_flash"}
    monkeypatch.setattr(benchmark_tables, "load_records", lambda paths: records + [padded])
    assert rendered() == before
    run_Z = {**run_C, "tokens_per_s": 1.0, "run": "Z"}
    monkeypatch.setattr(benchmark_tables, "load_records", lambda paths: records + [run_Z])
    assert doc_tables.TABLES["benchmark-training"](device=H100, run="C") == before["benchmark-training"]
    # ... and a later run of the targets suite leaves the targets table, which takes its named runs only
    run_E = next(
        r
        for r in records
        if (r.get("suite"), r.get("run"), r.get("variant"), r.get("mode")) == ("targets", "E", "P8", "fast")
    )
    monkeypatch.setattr(
        benchmark_tables, "load_records", lambda paths: records + [{**run_E, "run": "Z", "decode_ms_per_token": 1.0}]
    )
    assert doc_tables.TABLES["benchmark-targets"](device=H100, runs="B,C,E") == before["benchmark-targets"]
    # ... while a later record of the same case replaces the earlier one
    monkeypatch.setattr(benchmark_tables, "load_records", lambda paths: records + [{**run_C, "tokens_per_s": 12345.0}])
    assert "**12,345**" in doc_tables.TABLES["benchmark-training"](device=H100, run="C")


def test_the_training_attention_table_compares_each_attention_with_the_bias_of_its_invocation(monkeypatch):
    def train(invocation, attention, step_ms, loss, norm, run="W"):
        return {
            "suite": "train",
            "device_name": "GPU X",
            "variant": "P8",
            "run": run,
            "invocation": invocation,
            "attention": attention,
            "step_ms": step_ms,
            "mfu": 0.3,
            "loss": loss,
            "trainable_gradient_norm": norm,
        }

    records = [
        train("first", "bias", 100.0, 2.0, 0.5),
        train("first", "padded_cudnn", 105.0, 2.0, 0.5005),
        train("second", "padded_cudnn", 99.0, 2.0, 0.5),
        train("second", "bias", 90.0, 2.0, 0.4),  # the second invocation's own bias is the reference there
        train("third", "padded_cudnn", 1.0, 1.0, 1.0, run="V"),  # another run: not in the table
    ]  # fmt: skip
    assert table_rows(monkeypatch, records, "benchmark-training-attention", device="GPU X", run="W") == [
        "| `bias` | 100.0 / 90.0 | 1.000× / 1.000× | 30.0 % / 30.0 % | +0.0e+00 / +0.0e+00 | +0.0e+00 / +0.0e+00 |",
        "| `padded_cudnn` | 105.0 / 99.0 | 1.050× / 1.100× | 30.0 % / 30.0 % | +0.0e+00 / +0.0e+00 | +1.0e-03 / +2.5e-01 |",
    ]


def test_the_decode_levers_table_gives_each_mode_of_one_run_at_P1_and_P8(monkeypatch):
    def decode(suite, mode, variant, ms, skips=0, equal=None, run="AC"):
        record = {"suite": suite, "device_name": "GPU X", "run": run, "mode": mode, "variant": variant}
        record |= {"decode_ms_per_token": ms, "cudagraph_skips": skips, "tokens_vs_eager": {"equal": equal}}
        return record

    records = [
        decode("targets", "eager", "P1", 20.0, skips=None),
        decode("targets", "eager", "P8", 24.0, skips=None),
        decode("targets", "fast", "P1", 2.0),
        decode("targets", "fast", "P8", 2.5),
        decode("targets", "fast_frozen", "P1", 10.0, skips=1),
        decode("targets", "fast_frozen", "P8", 8.0, skips=1),
        decode("equality", "fast", "P8", 7.0, equal=True),  # float32: its tokens, not its time
        decode("targets", "fast", "P8", 1.0, run="E"),  # another run: not in the table
    ]  # fmt: skip
    assert table_rows(monkeypatch, records, "benchmark-decode-levers", device="GPU X", run="AC") == [
        "| `eager` | 20.00 | 24.00 | 1.20× | – | – |",
        "| `fast` | 2.00 | 2.50 | 1.25× | 0 / 0 | yes |",
        "| `fast_frozen` | 10.00 | 8.00 | 0.80× | 1 / 1 | – |",  # no float32 case in the run
    ]


def targets_record(run, invocation, mode, variant, batch, ms, suite="targets", equal=None, **fields) -> dict:
    """A decode record of the targets (or, float32, equality) suite on "GPU X", for the lever tables' tests."""
    record = {"suite": suite, "device_name": "GPU X", "run": run, "invocation": invocation, "mode": mode}
    record |= {"variant": variant, "batch": batch, "decode_ms_per_token": ms, "tokens_vs_eager": {"equal": equal}}
    return record | fields


def test_the_fused_projections_table_pairs_the_two_modes_within_one_invocation(monkeypatch):
    decode = targets_record
    records = [
        decode("AE", "a", "fast", "P1", 1, 2.0),
        decode("AE", "a", "fast_fused", "P1", 1, 1.5),
        decode("AE", "a", "fast", "P8", 1, 2.5),  # its fast_fused case not measured in this invocation: no row
        decode("AF", "b", "fast_fused", "P8", 1, 2.0),  # another invocation: not paired with AE's fast P=8
        decode("AF", "c", "fast", "P8", 1, 4.0),
        decode("AF", "c", "fast_fused", "P8", 1, 3.0),
        decode("AF", "d", "fast_fused", "P8", 1, 9.0, suite="equality", equal=True),  # float32: its tokens only
        decode("AG", "e", "fast", "P8", 1, 1.0),  # a run not named
        decode("AG", "e", "fast_fused", "P8", 1, 1.0),
    ]  # fmt: skip
    rows = table_rows(monkeypatch, records, "benchmark-fused-projections", device="GPU X", runs="AE,AF")
    assert rows == ["| AE | 1 | 1 | 2.00 | 1.50 | 0.750× | – |", "| AF | 8 | 1 | 4.00 | 3.00 | 0.750× | yes |"]


def test_the_compiled_prefill_table_pairs_the_two_modes_within_one_invocation(monkeypatch):
    def decode(invocation, mode, variant, prefill, warmup, ms, suite="targets", equal=None, run="AL"):
        times = {"prefill_ms": prefill, "warmup_s": warmup}
        return targets_record(run, invocation, mode, variant, 1, ms, suite=suite, equal=equal, **times)

    records = [
        decode("a", "fast", "P8", 60.0, 40.0, 2.5),
        decode("a", "fast_prefill", "P8", 30.0, 50.0, 2.6),
        decode("a", "fast_fused", "P8", 60.0, 40.0, 2.0),  # another lever: not in this table
        decode("b", "fast_prefill", "P1", 20.0, 50.0, 2.0),  # fast not measured in this invocation: no row
        decode("c", "fast_prefill", "P8", 9.0, 9.0, 9.0, suite="equality", equal=False),  # float32: its tokens only
        decode("d", "fast", "P8", 1.0, 1.0, 1.0, run="AK"),  # a run not named
        decode("d", "fast_prefill", "P8", 1.0, 1.0, 1.0, run="AK"),
    ]  # fmt: skip
    rows = table_rows(monkeypatch, records, "benchmark-compiled-prefill", device="GPU X", runs="AL")
    assert rows == ["| AL | 8 | 1 | 60.0 | 30.0 | 0.50× | 40.0 / 50.0 | 2.50 / 2.60 | no |"]


def test_the_greedy_choice_table_gives_both_choices_per_number_of_rows(monkeypatch):
    def selector(variant, rows, ms, equal=1.0, run="AL"):
        return {"suite": "selector", "device_name": "GPU X", "run": run, "variant": variant, "rows": rows} | {
            "vocab_size": 151936,
            "ms_per_call": ms,
            "tokens_equal_fraction": equal,
        }

    records = [
        selector("selector", 160, 3.0),  # a sampling case: not in the table
        selector("argmax", 1, 0.024),
        selector("greedy", 1, 0.003),
        selector("argmax", 8, 0.025, equal=0.5),
        selector("greedy", 8, 0.005),
        selector("greedy", 1, 9.0, run="AK"),  # another run
    ]
    assert table_rows(monkeypatch, records, "benchmark-greedy-choice", device="GPU X", run="AL") == [
        "| 1 | 151,936 | 24.0 | 3.0 | 0.12× | yes |",
        "| 8 | 151,936 | 25.0 | 5.0 | 0.20× | no |",
    ]


def test_the_attention_accuracy_table_gives_each_kernel_and_sharpness_of_one_run(monkeypatch):
    def accuracy(attention, sharpness, error, run="AG"):
        errors = dict.fromkeys(
            ("output", "query_grad", "key_grad_prefix", "key_grad_rest", "value_grad_prefix", "value_grad_rest"), error
        )
        return {"suite": "attention_accuracy", "device_name": "GPU X", "run": run, "attention": attention} | {
            "sharpness": sharpness,
            "relative_error": errors | {"key_grad_prefix": 2 * error},
            "forward_backward_ms": 1.234,
        }

    records = [accuracy("bias", 1.0, 1e-3), accuracy("bias_fa4", 4.0, 2.5e-3), accuracy("bias", 1.0, 9.0, run="AA")]
    assert table_rows(monkeypatch, records, "benchmark-attention-accuracy", device="GPU X", run="AG") == [
        "| `bias` | 1 | 1.0000e-03 | 1.0000e-03 | 2.0000e-03 | 1.0000e-03 | 1.0000e-03 | 1.0000e-03 | 1.23 |",
        "| `bias_fa4` | 4 | 2.5000e-03 | 2.5000e-03 | 5.0000e-03 | 2.5000e-03 | 2.5000e-03 | 2.5000e-03 | 1.23 |",
    ]


def test_the_prefill_table_pairs_each_P_of_the_two_runs_in_fast_mode(monkeypatch):
    def sampling(run, P, mode, ttft, rate, memory):
        return {
            "suite": "sampling",
            "device_name": "GPU X",
            "run": run,
            "P": P,
            "mode": mode,
            "ttft_ms": ttft,
            "completions_per_s": rate,
            "peak_mem_gib": memory,
        }

    records = [
        sampling("K", 8, "fast", 581.2, 22.29, 16.75),
        sampling("K", 8, "fast_heads_copied", 1.0, 1.0, 1.0),  # another mode: not in the table
        sampling("K", 1, "fast", 98.5, 51.23, 3.08),  # P=1 not measured in the later run: no row
        sampling("N", 8, "fast", 52.4, 24.24, 11.96),
        {**sampling("N", 8, "fast", 0.0, 0.0, 0.0), "device_name": "GPU Y"},  # another device
    ]  # fmt: skip
    rows = table_rows(monkeypatch, records, "benchmark-sampling-prefill", device="GPU X", before="K", after="N")
    assert rows == ["| 8 | 581 / **52** | 22.3 / **24.2** | 16.8 / **12.0** |"]


def test_marker_arguments_reach_the_table(monkeypatch):
    seen = {}
    monkeypatch.setitem(doc_tables.TABLES, "probe", lambda **kwargs: seen.update(kwargs) or "| rendered |\n")
    text = '<!-- table:probe device="a b" run=H -->\n| old |\n<!-- /table -->'
    assert doc_tables.render(text) == '<!-- table:probe device="a b" run=H -->\n| rendered |\n<!-- /table -->'
    assert seen == {"device": "a b", "run": "H"}


def test_the_sweep_tables_show_every_arm_with_gains_for_the_sweep_s_p_only(tmp_path):
    # The runs of the first sweep (2 GPUs) and new arms as stream_sweep.py writes them now, on 1 GPU
    for name in ("base", "P1", "P8", "P8-1gpu"):
        shutil.copytree(RESULTS / "stream-sweep" / name, tmp_path / name)
    for name, kind, P, T, final in (
        ("P4", "parscale", 4, 48, 1.30),
        ("P1T192", "parscale", 1, 192, 1.31),
        ("lora@6e-4", "lora", None, None, 1.20),
    ):
        (tmp_path / name).mkdir()
        result = {"name": name, "arm": name, "kind": kind, "P": P, "prefix_length": T, "processes": 1}
        result |= {"steps": 616, "train_tokens": 616 * 32768, "segments": [{"steady_step_s": 0.5}]}
        result["heldout_curve"] = [(0, 1.49), (616 * 32768, final)]
        (tmp_path / name / "result.json").write_text(json.dumps(result))
    table = results_tables.stream_sweep(path=str(tmp_path))
    lines = table.splitlines()
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines[2:]] == [
        "base (no adapter)",
        "P=1",
        "P1T192",
        "P=4",
        "P=8",
        "lora@6e-4",
    ]
    assert lines[0].endswith("| tokens/s, GPUs (steady; range over segments) |")  # 1 and 2 GPUs: said per row
    # 32,768 tokens per step in 0.5 s; 1.2 against the base model's 1.4792
    assert "| lora@6e-4 | 20,185,088 | 1.4900 | 1.2000 | −0.2792 | 65,536, 1 GPU |" in lines
    assert "| P=1 | 20,185,088 | 1.4937 | 1.3389 | −0.1403 | 195,642, 2 GPUs |" in lines
    curves = results_tables.stream_sweep_curves(path=str(tmp_path)).splitlines()
    assert [line.split(" | ")[0].removeprefix("| ") for line in curves[2:]] == [
        "P=1",
        "P1T192",
        "P=4",
        "P=8",
        "lora@6e-4",
        "gain, P=4",
        "gain, P=8",
    ]
    # the gain of P=4 over P=1 at 20.19 M tokens: 1.3389 − 1.30
    assert curves[-2].endswith("| 0.0389 |")


def test_a_sweep_in_progress_has_no_base_row_and_says_which_runs_shared_the_gpu(tmp_path):
    # two finished runs of the one-GPU sweep before its base model is scored: one shared the GPU with two other runs
    # in both segments, one trained alone in its second segment (32,768 tokens a step in 0.5 s)
    for name, shared in (("P1", (3, 3)), ("P1T192@5e-2", (3, 1))):
        (tmp_path / name).mkdir()
        result = {"name": name, "arm": name, "kind": "parscale", "P": 1, "prefix_length": 48 if name == "P1" else 192}
        result |= {"processes": 1, "steps": 616, "train_tokens": 616 * 32768}
        result["segments"] = [{"steady_step_s": 0.5, "gpu_shared_by": count} for count in shared]
        result["heldout_curve"] = [(0, 1.49), (616 * 32768, 1.33)]
        (tmp_path / name / "result.json").write_text(json.dumps(result))
    lines = results_tables.stream_sweep(path=str(tmp_path)).splitlines()
    assert lines[2:] == [
        "| P=1 | 20,185,088 | 1.4900 | 1.3300 | - | shared by 3 |",
        "| P1T192@5e-2 | 20,185,088 | 1.4900 | 1.3300 | - | 65,536 |",
    ]


def test_sweep_speeds_come_from_each_runs_last_device_and_name_it_where_devices_differ(tmp_path):
    # P=4 trained alone on an H100 (one segment without a device, from before segments named it); P=8 alone on an
    # H100 for a segment, then alone on an H200, where it ended (its last segment too short for a median): 32,768
    # tokens a step
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    for name, device, segments in (
        ("P4", h100, [{"steady_step_s": 1.25, "gpu_shared_by": 1}]),
        (
            "P8",
            h200,
            [
                {"steady_step_s": 2.0, "gpu_shared_by": 1, "device": h100},
                {"steady_step_s": 1.0, "gpu_shared_by": 1, "device": h200},
                {"steady_step_s": None, "gpu_shared_by": 1, "device": h200},  # too few steps for a median
            ],
        ),
    ):
        (tmp_path / name).mkdir()
        result = {"name": name, "arm": name, "kind": "parscale", "P": int(name[1:]), "prefix_length": 48}
        result |= {"processes": 1, "steps": 616, "train_tokens": 616 * 32768, "device": device, "segments": segments}
        result["heldout_curve"] = [(0, 1.49), (616 * 32768, 1.33)]
        (tmp_path / name / "result.json").write_text(json.dumps(result))
    lines = results_tables.stream_sweep(path=str(tmp_path)).splitlines()
    assert lines[2:] == [
        f"| P=4 | 20,185,088 | 1.4900 | 1.3300 | - | 26,214 ({h100}) |",
        f"| P=8 | 20,185,088 | 1.4900 | 1.3300 | - | 32,768 ({h200}) |",
    ]
    (tmp_path / "P4" / "result.json").unlink()  # one device left: the speed alone
    assert results_tables.stream_sweep(path=str(tmp_path)).splitlines()[2:] == [
        "| P=8 | 20,185,088 | 1.4900 | 1.3300 | - | 32,768 |"
    ]


def test_the_sweep_report_tables_are_the_ones_its_report_json_holds(tmp_path):
    report = {"grid_table": "| grid |\n| --- |\n| lora-grid |", "paired_table": "| comparison |", "table": "| x |"}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert results_tables.stream_sweep_report(str(tmp_path), "grid_table") == report["grid_table"] + "\n"
    assert results_tables.stream_sweep_report(str(tmp_path), "paired_table") == "| comparison |\n"
    with pytest.raises(ValueError, match="grid_table and paired_table"):
        results_tables.stream_sweep_report(str(tmp_path), "table")


def test_the_decision_table_gives_each_arm_over_its_seeds_with_the_base_model_first(tmp_path):
    def score(value, runs=None):
        return {"value": value, "low": value - 0.01, "high": value + 0.01, **({"run_values": runs} if runs else {})}

    def run(name, kind, parameters, speed, decode=(None, None)):
        return {
            "name": name,
            "kind": kind,
            "trainable_parameters": parameters,
            "train_tokens_per_s": speed,
            "decode_ms_per_token_b1": decode[0],
            "decode_ms_per_token_b8": decode[1],
        }

    results = {
        "rows": [
            {**run("base", "base", None, None, (1.234, 1.5)), "heldout_loss": score(1.5),
             "completion_pass@1": score(0.4), "chat_pass@1": score(0.5), "sampled_pass@1": score(0.2),
             "sampled_pass@10": score(0.6)},
            run("lora@1e-3", "lora", 1000, 900.0), run("lora@1e-3#1", "lora", 1000, 900.0),
            # one of P8's trainings sampled: its cells carry its seed
            {**run("P8#1", "parscale", 2000, 500.0, (1.8, None)), "sampled_pass@1": score(0.15),
             "sampled_pass@10": score(0.55), "decode_vs_base_b1": 1.16},  # measured beside the base model
            run("P2", "parscale", 300, 1500.0),
        ],
        "over_seeds": [
            {"name": name, "kind": kind, "P": P, "heldout_loss": score(loss, [loss, loss]),
             "completion_pass@1": score(0.3, [0.3, 0.3]), "chat_pass@1": score(0.35, [0.3, 0.4])}
            for name, kind, P, loss in [("lora@1e-3", "lora", None, 1.1), ("P8", "parscale", 8, 1.2),
                                        ("P2", "parscale", 2, 1.25)]
        ] + [{"name": "P1T8@1e-2", "kind": "parscale", "P": 1, "completion_pass@1": None}],  # validation only
    }  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "bench.jsonl").write_text(json.dumps({"suite": "env", "device_name": "GPU X"}) + "\n")
    table = results_tables.humaneval_decision(str(tmp_path / "results.json"), str(tmp_path / "bench.jsonl"))
    lines = table.splitlines()
    assert "training tokens/s (GPU X, alone)" in lines[0]
    same_for_arms = "0.300 [0.290, 0.310] | 0.350 [0.340, 0.360]"
    assert lines[2:] == [
        (
            "| base | 1 | – | – | 1.23 / 1.50 | 1.500 [1.490, 1.510] | 0.400 [0.390, 0.410] | 0.500 [0.490, 0.510] "
            "| 0.200 [0.190, 0.210] | 0.600 [0.590, 0.610] | 1 |"
        ),
        f"| P2 | 2 | 300 | 1,500 | – | 1.250 [1.240, 1.260] | {same_for_arms} | – | – | 2 |",
        (
            f"| P8 | 8 | 2,000 | 500 | 1.80 (1.16×) / – | 1.200 [1.190, 1.210] | {same_for_arms} "
            "| 0.150 [0.140, 0.160] (#1) | 0.550 [0.540, 0.560] (#1) | 2 |"
        ),
        f"| lora@1e-3 | 1 (merged) | 1,000 | 900 | – | 1.100 [1.090, 1.110] | {same_for_arms} | – | – | 2 |",
    ]


def test_the_kernel_gradients_table_sets_each_record_against_the_first_bias_of_its_invocation(monkeypatch):
    def train(attention, invocation, kernel, loss, weight, bias, prefixes, run="AS"):
        norms = {
            "streams.parscale_aggregator.default.0.weight": 0.0,
            "streams.parscale_aggregator.default.2.weight": weight,
            "streams.parscale_aggregator.default.2.bias": bias,
            "layers.0.parscale_prefix": prefixes[0],
            "layers.1.parscale_prefix": prefixes[1],
        }
        return {
            "suite": "train",
            "device_name": "GPU X",
            "run": run,
            "invocation": invocation,
            "variant": "P8",
            "attention": attention,
            "init_std": 0.5,
            "attention_kernels": [kernel, "triton_poi_fused_backward"],
            "step_ms": 90.04,
            "loss": loss,
            "gradient_norms": norms,
            "trainable_gradient_norm": sum(value * value for value in norms.values()) ** 0.5,
        }

    records = [
        train("bias", "1", "void pytorch_flash::flash_fwd_kernel<...>", 10.0, 3.0, 0.5, (1.0, 2.0)),
        train("bias_fa4", "1", "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90", 10.001, 3.03, 0.55, (1.0, 1.98)),
        train("bias", "1", "void pytorch_flash::flash_fwd_kernel<...>", 10.0, 3.0, 0.5, (1.001, 2.0)),
        train("padded_cudnn", "2", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 20.0, 3.0, 0.5, (1.0, 2.0)),
        train("bias", "2", "void pytorch_flash::flash_fwd_kernel<...>", 10.0, 6.0, 1.0, (2.0, 4.0)),  # the reference
        train("bias", "3", "void pytorch_flash::flash_fwd_kernel<...>", 10.0, 3.0, 0.5, (1.0, 2.0), run="AA"),
    ]
    # whole adapter, bias_fa4 against bias: sqrt(3.03² + 0.55² + 1 + 1.98²) / sqrt(9 + 0.25 + 1 + 4) - 1 = +0.54 %
    assert table_rows(monkeypatch, records, "benchmark-kernel-gradients", device="GPU X", runs="AS") == [
        "| AS | 0.5 | `bias` | FlashAttention-2 | 90.0 | +0.0e+00 | +0.00 % | +0.00 % | 0.00 % | +0.00 % |",
        "| AS | 0.5 | `bias_fa4` | FlashAttention-4 | 90.0 | +1.0e-04 | +1.00 % | +10.00 % | 1.00 % | +0.54 % |",
        "| AS | 0.5 | `bias` | FlashAttention-2 | 90.0 | +0.0e+00 | +0.00 % | +0.00 % | 0.10 % | +0.01 % |",
        "| AS | 0.5 | `padded_cudnn` | cuDNN | 90.0 | +1.0e+00 | -50.00 % | -50.00 % | 50.00 % | -50.00 % |",
        "| AS | 0.5 | `bias` | FlashAttention-2 | 90.0 | +0.0e+00 | +0.00 % | +0.00 % | 0.00 % | +0.00 % |",
    ]
