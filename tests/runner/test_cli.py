"""`python -m runner`: a user's mistake is one line on stderr, the traceback only with --debug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runner.__main__ import main


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True,
                          timeout=300)


def test_a_wrong_model_path_is_one_line_without_traceback(tmp_path: Path) -> None:
    done = _cli("generate", "--model", str(tmp_path / "missing"), "hello")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith("error: model folder ") and str(tmp_path / "missing") in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("where", ["before the command", "after the command"])
def test_debug_shows_the_traceback(tmp_path: Path, where: str) -> None:
    args = ["generate", "--model", str(tmp_path / "missing"), "hello"]
    done = _cli(*(["--debug", *args] if where == "before the command" else [*args, "--debug"]))
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "FileNotFoundError: model folder " in done.stderr
    assert "error: " not in done.stderr


def test_a_bad_sampling_value_is_refused_before_the_model_loads(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import runner

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the sampling settings were checked")

    monkeypatch.setattr(runner, "LLM", no_load)
    assert main(["generate", "--temperature", "-1"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("error: SamplingParams.temperature: expected a finite number >= 0 (0 means greedy), "
                   "got -1.0\n")


def test_a_bad_bench_shape_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "--num-heads", "3", "--num-kv-heads", "2", "--no-reference",
                 "--output", str(tmp_path / "bench.json")]) == 1
    _, err = capsys.readouterr()
    assert err.startswith("error: ModelConfig.") and err.count("\n") == 1
    assert not (tmp_path / "bench.json").exists()


def test_debug_lets_a_bad_value_raise(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="SamplingParams.temperature"):
        main(["generate", "--temperature", "-1", "--debug"])
    assert capsys.readouterr().err == ""


def test_a_malformed_command_line_is_still_argparse_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--max-tokens", "many"])
    assert exit_info.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err
