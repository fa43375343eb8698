"""The result-code table: one exception class per failure code, both ways."""

from __future__ import annotations

import pytest

from sheep import errors
from sheep.errors import Result, SheepError, UnknownError, UsageError, error_class, error_for

sheepdog_exit_codes = {
    errors.EXIT_FAILURE, errors.EXIT_SYSTEM, errors.EXIT_EXISTS, errors.EXIT_FULL,
    errors.EXIT_MISSING, errors.EXIT_USAGE, errors.EXIT_PERMISSION,
}


def wire_classes() -> list[type[SheepError]]:
    # UsageError shares INVALID_PARMS on purpose: it is raised by the command
    # line front ends and never travels, so it is left out of the bijection.
    return [cls for cls in SheepError.__subclasses__() if cls is not UsageError]


def test_exit_codes_are_sheepdogs():
    assert sheepdog_exit_codes == {1, 2, 3, 4, 5, 64, 77}  # 77: sysexits' EX_NOPERM
    assert errors.EXIT_SUCCESS == 0


def test_every_failure_code_has_exactly_one_class():
    classes = wire_classes()
    results = [cls.result for cls in classes]
    assert len(results) == len(set(results)), "one class per code"
    assert set(results) == set(Result) - {Result.SUCCESS}


@pytest.mark.parametrize("result", sorted(set(Result) - {Result.SUCCESS}))
def test_code_to_class_and_back(result):
    cls = error_class(result)
    assert cls.result is result
    assert error_class(cls.result) is cls
    assert error_class(int(result)) is cls
    assert cls.exit_code in sheepdog_exit_codes
    error = error_for(result, "details")
    assert type(error) is cls and error.message == "details"
    assert error_for(result).message == cls.default_message


@pytest.mark.parametrize("cls", wire_classes(), ids=lambda cls: cls.__name__)
def test_class_to_code_and_back(cls):
    assert error_class(cls.result) is cls
    assert cls.exit_code in sheepdog_exit_codes
    assert cls.default_message
    assert isinstance(cls(), SheepError)


def test_codes_are_unique():
    values = [int(result) for result in Result]
    assert len(values) == len(set(values))
    assert len({result.name for result in Result}) == len(values)


def test_usage_error():
    assert UsageError.exit_code == errors.EXIT_USAGE
    assert UsageError.result is Result.INVALID_PARMS


@pytest.mark.parametrize("code", [max(Result) + 1, 999, 2**16 - 1, -1])
def test_unknown_code_gives_unknown_error(code):
    assert error_class(code) is UnknownError
    assert isinstance(error_for(code, "what"), UnknownError)
    assert error_for(code, "what").message == "what"


def test_success_has_no_exception_class():
    assert error_class(Result.SUCCESS) is UnknownError
