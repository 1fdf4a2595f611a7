"""Every notebook in notebooks/ executes top to bottom without an error, a warning or
anything on stderr, and shows what it is there to show."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def test_the_five_notebooks_exist() -> None:
    assert {p.stem for p in NOTEBOOKS} == {"quickstart", "weight_lifecycle", "training_to_serving",
                                           "benchmark", "grpo"}


def _outputs(book: Any) -> list[Any]:
    return [o for cell in book.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def _text(output: Any) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return "".join(str(data.get(kind, "")) for kind in ("text/plain", "text/html", "text/markdown"))


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """`executed(name)`: that notebook with its outputs. Each runs once for all its tests
    (a failure too is kept, and raised again, rather than paid for twice)."""
    done: dict[str, Any] = {}

    def run(name: str) -> Any:
        if name not in done:
            book = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
            # Run in a scratch folder: figures the notebooks save must not land in the repository.
            client = NotebookClient(book, timeout=600, kernel_name="python3",
                                    resources={"metadata": {"path": str(tmp_path_factory.mktemp(name))}})
            try:
                client.execute()
                done[name] = book
            except Exception as e:  # kept, so that its other tests fail without running it again
                done[name] = e
        if isinstance(done[name], Exception):
            raise done[name]
        return done[name]

    return run


NAMES = [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(executed: Callable[[str], Any], name: str) -> None:
    errors = [o for o in _outputs(executed(name)) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("name", NAMES)
def test_notebook_output_carries_no_warning(executed: Callable[[str], Any], name: str) -> None:
    # A warning a user sees in a tutorial (a missing widget library, a deprecated call) reads
    # as a fault of the library; a progress bar drawn as text on stderr is clutter.
    outputs = _outputs(executed(name))
    stderr = [o.text for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not stderr
    warnings = [_text(o) for o in outputs if "Warning" in _text(o)]
    assert not warnings


def test_benchmark_draws_its_figure_inline(executed: Callable[[str], Any]) -> None:
    assert any("image/png" in o.get("data", {}) for o in _outputs(executed("benchmark")))


def test_grpo_draws_its_curve_and_shows_the_reward_rise(executed: Callable[[str], Any]) -> None:
    outputs = _outputs(executed("grpo"))
    assert any("image/png" in o.get("data", {}) for o in outputs)
    line = next(line for o in outputs for line in _text(o).splitlines() if line.startswith("reward: first 5 steps"))
    first, last = (float(word.rstrip(",")) for word in line.split() if word[0].isdigit() and "." in word)
    assert last > first + 0.15
    assert any(line.startswith("sync share of a step: ") for o in outputs for line in _text(o).splitlines())


def test_quickstart_shows_a_refused_change(executed: Callable[[str], Any]) -> None:
    refused = [line for o in _outputs(executed("quickstart")) for line in _text(o).splitlines()
               if line.startswith("refused: ")]
    assert refused and "max_model_len cannot change on a running runner" in refused[0]
