"""Shared test utilities of the ev monorepo (unpublished)."""

from ev_testing.distributed import run_distributed
from ev_testing.package_checks import check_package_basics
from ev_testing.tolerances import TOLERANCES, BaseTester, assert_close, tolerance

__all__ = [
    "TOLERANCES",
    "BaseTester",
    "assert_close",
    "check_package_basics",
    "run_distributed",
    "tolerance",
]
