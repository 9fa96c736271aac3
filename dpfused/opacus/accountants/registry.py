"""Opacus' accountant registry: ``create_accountant("rdp" | "prv")``, ``register_accountant``."""

from __future__ import annotations

from dpfused.opacus.accountants.accountants import (
    GDP_REFUSAL,
    IAccountant,
    PRVAccountant,
    RDPAccountant,
)

__all__ = ["create_accountant", "register_accountant"]

_ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}


def register_accountant(mechanism: str, accountant: type[IAccountant], force: bool = False) -> None:
    """Register ``accountant`` under ``mechanism``.

    Raises:
        ValueError: the name is taken (unless ``force``), or it is "gdp".
    """
    if mechanism == "gdp":
        raise ValueError(GDP_REFUSAL)
    if mechanism in _ACCOUNTANTS and not force:
        raise ValueError(f"Accountant for mechanism {mechanism} is already registered")
    _ACCOUNTANTS[mechanism] = accountant


def create_accountant(mechanism: str) -> IAccountant:
    """A new accountant for ``mechanism`` ("rdp", "prv", or a registered name).

    Raises:
        ValueError: "gdp" (with the reason) or an unknown name.
    """
    if mechanism == "gdp":
        raise ValueError(GDP_REFUSAL)
    if mechanism in _ACCOUNTANTS:
        return _ACCOUNTANTS[mechanism]()
    raise ValueError(f"Unexpected accounting mechanism: {mechanism!r}; use one of "
                     f"{sorted(_ACCOUNTANTS)}")
