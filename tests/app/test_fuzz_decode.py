"""The decode fuzz target (tests/fuzz/fuzz_decode.py) for a short, bounded run in CI: a seed corpus
made on the fly, libFuzzer stops itself after FUZZ_DECODE_SECONDS (default 12). A finding (an
exception other than a 4xx ApiError, a crash, a 10 s hang, 2 GB of RSS) fails the test and leaves
its input as crash-*/timeout-*/oom-* in the test's tmp folder. The long run is in the target's
docstring."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TARGET = Path(__file__).parents[1] / "fuzz" / "fuzz_decode.py"
SECONDS = int(os.environ.get("FUZZ_DECODE_SECONDS", "12"))

atheris = pytest.importorskip("atheris", reason="atheris (the [dev] extra) is not installed")


@pytest.mark.slow
def test_fuzzing_the_decode_path_finds_nothing(tmp_path):
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, TARGET, "--make-corpus", corpus], check=True, timeout=120)
    # the harness imports torch (model.preprocess): 1.1 GB before the first input, so 2 GB left
    # libFuzzer's own growth too little room under a loaded machine; one decode adds ~20 MB
    flags = [f"-max_total_time={SECONDS}", "-rss_limit_mb=3072", "-timeout=10", "-max_len=65536"]
    run = subprocess.run(
        [sys.executable, TARGET, corpus, *flags],
        cwd=tmp_path,  # where libFuzzer writes the input of a finding
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
    )
    output = "\n".join(
        line for line in run.stderr.splitlines() if not line.startswith("INFO: Instrumenting")
    )
    findings = sorted(p.name for p in tmp_path.glob("*-*") if p.is_file())
    assert run.returncode == 0 and not findings, f"{findings}\n{output[-4000:]}"
    assert "Done " in output
    print(next(line for line in output.splitlines() if "DONE" in line))
