"""Losses shared by the ev packages."""

from ev_core.losses.contrastive import (
    ContrastiveOutput,
    InfoNCELoss,
    MACLLoss,
    SupConLoss,
    info_nce_loss,
    macl_loss,
    macl_temperature,
    supcon_loss,
)

__all__ = [
    "ContrastiveOutput",
    "InfoNCELoss",
    "MACLLoss",
    "SupConLoss",
    "info_nce_loss",
    "macl_loss",
    "macl_temperature",
    "supcon_loss",
]
