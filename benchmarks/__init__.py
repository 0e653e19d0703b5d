"""Performance measurements of peft_parscale: decode latency and memory sweep, the parallel-vs-parameter scaling
comparison, training throughput. Entry point: `python -m benchmarks.run` (see BENCHMARKS.md)."""
