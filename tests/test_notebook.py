"""notebooks/load_best.ipynb executes on a real search on S3, in a fresh kernel, with no Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "load_best.ipynb"


def test_load_best_notebook_runs_on_a_search_on_s3(tune_search: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENSRAY_EXPERIMENT", tune_search.experiment_url)  # the AWS_* settings of moto are inherited
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a laptop with no cluster: nothing to connect to
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import ray\nprint('ray initialized:', ray.is_initialized())"))

    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    best = tune_search.summary.best
    assert f"best trial {best['trial_id']}: val_auc {best['value']:.3f}" in printed
    assert "ray initialized: False" in printed, "load_best must not start or need a cluster"
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) == 3, "learning curves, ROC, predictions"
    tables = [output["data"]["text/html"] for output in outputs if "text/html" in output.get("data", {})]
    assert len(tables) == 1 and all(trial_id in tables[0] for trial_id in tune_search.summary.table["trial_id"])
