"""Benchmarks: speed and memory as ratios against the frozen base and HF PEFT, same run."""
