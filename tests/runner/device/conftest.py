"""Checkpoints the lifecycle and weight-sync tests share."""

from __future__ import annotations

import pytest

from tests import hf_models


@pytest.fixture(scope="module")
def tied(hf_checkpoint):
    return hf_checkpoint("qwen3_tied")[0]


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Same architecture as `tied`, other weights."""
    return hf_models.save_variant("qwen3_tied", tmp_path_factory.mktemp("other"), seed=1)[0]
