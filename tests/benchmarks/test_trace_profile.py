"""benchmarks/trace_profile.py on W1: XLA's trace events, named back to the model's stages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_trace_profile_names_every_stage_and_adds_up_to_the_program():
    done = subprocess.run([sys.executable, "benchmarks/trace_profile.py", "--batch-size", "2", "--max-tokens", "6"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    programs = {}
    for line in done.stdout.splitlines():
        m = re.match(r"(multi-step decode|general step): ([\d.]+) ms (?:per [\w ]+|all calls): (.*)$", line)
        if m:
            parts = {k: float(v) for k, v in (p.rsplit(" ", 1) for p in m.group(3).split(", "))}
            programs[m.group(1)] = (float(m.group(2)), parts)
    assert set(programs) == {"multi-step decode", "general step"}, done.stdout
    for total, parts in programs.values():
        # Side-by-side operations share their span: the stages add up to the program's time.
        assert abs(sum(parts.values()) - total) < 0.02 + 0.01 * total, (total, parts)
        # The named scopes reach the compiled program: each stage has operations of its own.
        assert {"weights", "lm_head", "attention", "sampler"} <= set(parts), parts
        assert parts["weights"] > 0 and parts["lm_head"] > 0 and parts["attention"] > 0
    assert programs["multi-step decode"][1].get("open", 0) > 0  # a multi-step decode gathers its context once
