"""The MPICOMM_* settings parse strictly and name the variable when malformed."""

import pytest
from mpi4py import MPI

import mpicomm
from mpicomm.config import settings, vllm_enabled
from mpicomm.validation import check_flag


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
        ("MPICOMM_TIMEOUT", "abc"),
        ("MPICOMM_ABORT_ON_EXCEPTION", "maybe"),
        ("MPICOMM_STAGING", "yes-please"),
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


def test_a_malformed_flag_names_the_allowed_spellings(monkeypatch):
    monkeypatch.setenv("MPICOMM_VLLM", "yes-please")
    with pytest.raises(ValueError, match=r"MPICOMM_VLLM must be 0 or 1 \(or true/yes/on, false"):
        vllm_enabled()


@pytest.mark.parametrize(
    ("given", "meant"),
    [("no", False), ("off", False), ("0", False), (0, False), ("YES", True), (1, True)],
)
def test_flag_arguments_parse_like_the_variables(given, meant):
    """Before: validate="no" turned validation on (bool("no") is True)."""
    c = mpicomm.MPICommunicator(MPI.COMM_SELF, validate=given, staging=given)
    try:
        assert (c.validate, c.staging) == (meant, meant)
    finally:
        c.destroy()


@pytest.mark.parametrize("given", ["maybe", 2, 0.5, None.__class__])
def test_a_flag_argument_that_is_no_flag_is_refused(given):
    with pytest.raises((TypeError, ValueError), match="validate must be"):
        check_flag(given, "validate")
    with pytest.raises((TypeError, ValueError), match="validate must be"):
        mpicomm.MPICommunicator(MPI.COMM_SELF, validate=given)
