"""verify's standard errors: clustered by sequence, and reported for int4 exports."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from phi_onnx.cli import main
from phi_onnx.verify.metrics import standard_error


def test_standard_error_clusters_by_sequence():
    rng = np.random.default_rng(0)
    values = rng.standard_normal(200)
    # one position per sequence: the usual s / sqrt(n)
    assert np.isclose(standard_error(list(values[:, None])), values.std(ddof=1) / np.sqrt(200))
    # equal-length sequences: the standard error of the sequence means
    groups = list(values.reshape(20, 10))
    means = values.reshape(20, 10).mean(1)
    assert np.isclose(standard_error(groups), means.std(ddof=1) / np.sqrt(20))
    # correlated positions (each sequence one constant): far larger than the naive figure
    correlated = [np.full(10, v) for v in values[:20]]
    assert standard_error(correlated) > 2.5 * np.concatenate(correlated).std(ddof=1) / np.sqrt(200)
    assert np.isnan(standard_error([values]))


def test_verify_reports_int4_kl_and_top1_standard_errors(make_export):
    result = CliRunner().invoke(main, ["verify", str(make_export("phi3-mha", "int4")), "--json", "--no-record",
                                       "--new-tokens", "4", "--text-tokens", "256", "--window", "64"],
                                catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output  # random weights: int4 top-1 may miss the limit
    figures = json.loads(result.stdout)["figures"]
    assert 0 < figures["kl_divergence_se"] < figures["kl_divergence"]
    assert 0 < figures["top1_agreement_se"] < 0.5
