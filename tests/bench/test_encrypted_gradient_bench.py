"""`fedhe bench encrypted-gradient`: both uploads reproduce NumPy's gradient, with the costs they report."""

from __future__ import annotations

import pytest

from benchmarks.encrypted_gradient import run_encrypted_gradient_bench


@pytest.mark.parametrize("upload", ["statistics", "transitions"])
def test_both_uploads_give_numpys_gradient_and_adam_step(upload):
    result = run_encrypted_gradient_bench(participants=3, transitions=600, plaintext=True, upload=upload)
    assert result["upload"] == upload and result["params"] == 211
    assert result["grad_rel_err"] < 1e-5 and result["theta_rel_err"] < 1e-4  # the collapse grid and rounding
    assert result["upload_bytes_per_participant"] > 0 and result["coordinator_ms_per_round"] > 0
    if upload == "statistics":  # one ciphertext per owner for CartPole (levels: tests/coordinator, real CKKS)
        assert (result["upload_ciphertexts"], result["terms"]) == (1, 1923)
    else:
        assert result["blocks_per_participant"] == 2


def test_an_unknown_upload_is_refused():
    with pytest.raises(ValueError, match="statistics or transitions"):
        run_encrypted_gradient_bench(participants=3, transitions=16, plaintext=True, upload="everything")
