"""The package installs, imports, reports its version and exposes its CLI."""

from ev_testing import check_package_basics


def test_package_basics() -> None:
    check_package_basics("ev-compress", "ev_compress", "compress")
