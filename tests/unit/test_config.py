"""The MPICOMM_* settings parse strictly and name the variable when malformed."""

import pytest

from mpicomm.config import settings


def test_defaults(monkeypatch):
    names = ("CUDA_AWARE", "STAGING", "VALIDATE", "TIMEOUT", "ALLREDUCE_ALGO", "LOG_LEVEL")
    for name in (*names, "HUGE_PAGES"):
        monkeypatch.delenv(f"MPICOMM_{name}", raising=False)
    s = settings()
    assert (s.cuda_aware, s.staging, s.validate, s.timeout, s.allreduce_algo, s.huge_pages) == (
        None,
        False,
        False,
        None,
        "auto",
        True,
    )


def test_values(monkeypatch):
    monkeypatch.setenv("MPICOMM_CUDA_AWARE", "0")
    monkeypatch.setenv("MPICOMM_VALIDATE", "yes")
    monkeypatch.setenv("MPICOMM_TIMEOUT", "2.5")
    monkeypatch.setenv("MPICOMM_ALLREDUCE_ALGO", "BYTES")
    s = settings()
    assert (s.cuda_aware, s.validate, s.timeout, s.allreduce_algo) == (False, True, 2.5, "bytes")
    monkeypatch.setenv("MPICOMM_TIMEOUT", "0")
    assert settings().timeout is None
    monkeypatch.setenv("MPICOMM_HUGE_PAGES", "0")
    assert settings().huge_pages is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MPICOMM_CUDA_AWARE", "maybe"),
        ("MPICOMM_TIMEOUT", "soon"),
        ("MPICOMM_TIMEOUT", "-1"),
        ("MPICOMM_ALLREDUCE_ALGO", "ring"),
        ("MPICOMM_HUGE_PAGES", "sometimes"),
    ],
)
def test_malformed_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        settings()


def test_vllm_pp_fix(monkeypatch):
    from mpicomm import config

    monkeypatch.delenv("MPICOMM_VLLM_PP_FIX", raising=False)
    assert config.vllm_pp_fix() is True
    monkeypatch.setenv("MPICOMM_VLLM_PP_FIX", "0")
    assert config.vllm_pp_fix() is False
    monkeypatch.setenv("MPICOMM_VLLM_PP_FIX", "maybe")
    with pytest.raises(ValueError, match="MPICOMM_VLLM_PP_FIX"):
        config.vllm_pp_fix()
